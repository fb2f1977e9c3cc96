//! Who answers for an elder: the elder registry (identity, home and geofence, per-elder
//! thresholds, bracelets), the contacts who answer (grid workers, guardians, supervisors) with
//! their roles and priorities, and bulk import from a community's ledger (CSV or TOML).
//!
//! The alert engine reads [`who_answers`] / [`who_answers_with`] and [`get_elder`]; the admin
//! CLI (`silverguard elder|contact|import`) writes through the rest. Every rule about what a
//! valid phone, date, language or threshold is lives here, not in the CLI, so the CLI, the
//! importer and the later HTTP API reject the same things with the same messages, each naming
//! the field at fault.
//!
//! Contacts are one row per person, found again by `external_ref` or by phone: the same grid
//! worker serves dozens of elders, and an SMS sent to "her" must not go out three times
//! because she was typed in three times. The schema has no unique index on `contacts.phone`
//! (see [`REGISTRY_LOCK`]), so every writer that matches by phone takes one advisory lock.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, NaiveDate, Utc};
use deadpool_postgres::Pool;
use serde::{Serialize, Serializer};
use tokio_postgres::{GenericClient, Row};

use super::devices::is_valid_device_id;
use super::StoreError;

/// Advisory lock taken (per transaction) by every writer that matches contacts by phone.
/// Without a unique index on `contacts.phone`, two concurrent imports could both miss the
/// same new grid worker and insert her twice; serializing the (short, admin-only) registry
/// writes prevents that. Same key namespace as [`super::locks`].
pub const REGISTRY_LOCK: i64 = super::locks::REGISTRY;

// ---------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------

/// Why a registry operation failed. Messages are meant for operators and name the field.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A value was rejected before anything was written.
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
    #[error("{0} not found")]
    NotFound(String),
    #[error("device {0} is not provisioned: add it with `silverguard device add {0}` (or bind with --provision)")]
    NotProvisioned(String),
    /// The request contradicts what is stored (e.g. a phone that belongs to someone else).
    #[error("{0}")]
    Conflict(String),
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// Every problem found in an import file; nothing was written.
    #[error("{path}: {} problem(s), nothing was imported:\n{}", .problems.len(), list_problems(.problems))]
    Import {
        path: String,
        problems: Vec<ImportProblem>,
    },
    /// The database refused a row while importing; the whole import was rolled back.
    #[error("{path} line {line}: {source}; nothing was imported")]
    ImportDb {
        path: String,
        line: usize,
        #[source]
        source: StoreError,
    },
}

impl RegistryError {
    /// True for errors worth retrying (the database was unreachable or restarting).
    pub fn is_transient(&self) -> bool {
        match self {
            RegistryError::Store(e) | RegistryError::ImportDb { source: e, .. } => e.is_transient(),
            _ => false,
        }
    }

    pub fn is_not_found(&self) -> bool {
        matches!(
            self,
            RegistryError::NotFound(_) | RegistryError::NotProvisioned(_)
        )
    }

    fn invalid(field: &str, message: impl Into<String>) -> Self {
        RegistryError::Invalid {
            field: field.to_string(),
            message: message.into(),
        }
    }

    /// A rejected value of `field` (for the other registry modules).
    pub fn invalid_field(field: &str, message: impl Into<String>) -> Self {
        Self::invalid(field, message)
    }

    fn invalid_all(problems: Vec<FieldProblem>) -> Self {
        let field = problems
            .iter()
            .map(|p| p.field.as_str())
            .collect::<Vec<_>>()
            .join(", ");
        let message = problems
            .iter()
            .map(|p| p.message.as_str())
            .collect::<Vec<_>>()
            .join("; ");
        RegistryError::Invalid { field, message }
    }
}

impl From<tokio_postgres::Error> for RegistryError {
    fn from(e: tokio_postgres::Error) -> Self {
        RegistryError::Store(StoreError::Db(e))
    }
}

impl From<deadpool_postgres::PoolError> for RegistryError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        RegistryError::Store(StoreError::Pool(e))
    }
}

/// One rejected field of a record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldProblem {
    pub field: String,
    pub message: String,
}

fn list_problems(problems: &[ImportProblem]) -> String {
    problems
        .iter()
        .map(|p| format!("  {p}"))
        .collect::<Vec<_>>()
        .join("\n")
}

// ---------------------------------------------------------------------------------------
// Value types and their parsers (also used as clap value parsers by the CLI)
// ---------------------------------------------------------------------------------------

/// The language notifications are written in (templates exist for these two).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Language {
    #[default]
    ZhCn,
    En,
}

impl Language {
    pub fn as_str(self) -> &'static str {
        match self {
            Language::ZhCn => "zh-CN",
            Language::En => "en",
        }
    }
}

impl fmt::Display for Language {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Language {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().replace('_', "-").as_str() {
            "zh-cn" | "zh" | "zh-hans" | "zh-hans-cn" => Ok(Language::ZhCn),
            "en" | "en-us" | "en-gb" => Ok(Language::En),
            _ => Err(format!("unknown language {:?}: use zh-CN or en", s.trim())),
        }
    }
}

impl Serialize for Language {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// The part a contact plays for one elder (the `elder_contacts.role` values).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    GridWorker,
    BackupGridWorker,
    Guardian,
    CommunitySupervisor,
    TownshipSupervisor,
}

impl Role {
    pub const ALL: [Role; 5] = [
        Role::GridWorker,
        Role::BackupGridWorker,
        Role::Guardian,
        Role::CommunitySupervisor,
        Role::TownshipSupervisor,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::GridWorker => "grid_worker",
            Role::BackupGridWorker => "backup_grid_worker",
            Role::Guardian => "guardian",
            Role::CommunitySupervisor => "community_supervisor",
            Role::TownshipSupervisor => "township_supervisor",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let norm = s.trim().to_ascii_lowercase().replace('-', "_");
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == norm)
            .ok_or_else(|| {
                format!(
                    "unknown role {:?}: use one of {}",
                    s.trim(),
                    Role::ALL.map(Role::as_str).join(", ")
                )
            })
    }
}

impl<'de> serde::Deserialize<'de> for Role {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl Serialize for Role {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// An elder's gender as the programme records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Gender {
    Female,
    Male,
}

impl Gender {
    pub fn as_str(self) -> &'static str {
        match self {
            Gender::Female => "female",
            Gender::Male => "male",
        }
    }
}

impl fmt::Display for Gender {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

/// `female` / `male`, also `f` / `m`, `女` / `男`.
impl FromStr for Gender {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match to_half_width(s).trim().to_lowercase().as_str() {
            "female" | "f" | "woman" | "女" | "女性" => Ok(Gender::Female),
            "male" | "m" | "man" | "男" | "男性" => Ok(Gender::Male),
            other => Err(format!(
                "unknown gender {other:?}: use female or male (女/男)"
            )),
        }
    }
}

impl Serialize for Gender {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// Why an elder is in the programme (the `elders.categories` values); an elder may be in
/// several.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Category {
    /// 独居: lives alone.
    LivingAlone,
    /// 空巢: children live elsewhere.
    EmptyNest,
    /// 留守: left behind in the village by working children.
    LeftBehind,
    /// 特困: in special hardship (state support).
    SpecialHardship,
}

impl Category {
    pub const ALL: [Category; 4] = [
        Category::LivingAlone,
        Category::EmptyNest,
        Category::LeftBehind,
        Category::SpecialHardship,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Category::LivingAlone => "living_alone",
            Category::EmptyNest => "empty_nest",
            Category::LeftBehind => "left_behind",
            Category::SpecialHardship => "special_hardship",
        }
    }

    /// The label the programme's ledgers use.
    pub fn label_zh(self) -> &'static str {
        match self {
            Category::LivingAlone => "独居",
            Category::EmptyNest => "空巢",
            Category::LeftBehind => "留守",
            Category::SpecialHardship => "特困",
        }
    }
}

impl fmt::Display for Category {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

/// The English value (`living_alone`, also with `-` or spaces) or the Chinese label
/// (独居, 空巢, 留守, 特困; also 独居老人, 空巢老人, 留守老人, 特困人员, 特困供养).
impl FromStr for Category {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let norm = to_half_width(s)
            .trim()
            .to_lowercase()
            .replace(['-', ' '], "_");
        let zh = norm
            .trim_end_matches("老人")
            .trim_end_matches("人员")
            .trim_end_matches("供养");
        Category::ALL
            .into_iter()
            .find(|c| c.as_str() == norm || c.label_zh() == zh)
            .ok_or_else(|| {
                format!(
                    "unknown category {:?}: use living_alone (独居), empty_nest (空巢), left_behind (留守) or special_hardship (特困)",
                    s.trim()
                )
            })
    }
}

impl Serialize for Category {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// Parses a list of categories (`独居;空巢`, `living_alone、left_behind`; commas work too,
/// since labels never contain one). Duplicates are dropped; the result is sorted.
pub fn parse_categories(raw: &str) -> Result<Vec<Category>, String> {
    let mut out = Vec::new();
    let mut bad = Vec::new();
    for item in to_half_width(raw)
        .split([';', '；', '、', ',', '，', '/'])
        .map(str::trim)
        .filter(|x| !x.is_empty())
    {
        match item.parse::<Category>() {
            Ok(c) => out.push(c),
            Err(m) => bad.push(m),
        }
    }
    if !bad.is_empty() {
        return Err(bad.join("; "));
    }
    out.sort();
    out.dedup();
    Ok(out)
}

/// A list of conditions or medications: items separated by `;`, `；` or `、`, each 1 to 200
/// characters, at most 50; duplicates dropped (first kept).
pub fn parse_text_list(raw: &str) -> Result<Vec<String>, String> {
    check_text_list(split_list(raw))
}

fn check_text_list(items: Vec<String>) -> Result<Vec<String>, String> {
    let mut out: Vec<String> = Vec::new();
    for item in items {
        let item = clean_text(&item);
        if item.is_empty() {
            continue;
        }
        if item.chars().count() > 200 {
            return Err(format!("{item:?} is longer than 200 characters"));
        }
        if item.chars().any(char::is_control) {
            return Err(format!("{item:?} contains control characters"));
        }
        if !out.contains(&item) {
            out.push(item);
        }
    }
    if out.len() > 50 {
        return Err(format!("{} items: at most 50", out.len()));
    }
    Ok(out)
}

/// A home location, stored as degrees × 10^7 like the bracelet's `Location`, so the geofence
/// check compares integers of the same scale.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HomeLocation {
    pub lat_e7: i32,
    pub lon_e7: i32,
}

impl HomeLocation {
    pub fn from_degrees(lat: f64, lon: f64) -> Result<Self, String> {
        if !lat.is_finite() || !(-90.0..=90.0).contains(&lat) {
            return Err(format!("latitude {lat} is outside -90..90"));
        }
        if !lon.is_finite() || !(-180.0..=180.0).contains(&lon) {
            return Err(format!("longitude {lon} is outside -180..180"));
        }
        if lat == 0.0 && lon == 0.0 {
            // Spreadsheets turn a missing value into 0; nobody in the programme lives there.
            return Err("0,0 is not a home location (a missing value?)".into());
        }
        Ok(HomeLocation {
            lat_e7: (lat * 1e7).round() as i32,
            lon_e7: (lon * 1e7).round() as i32,
        })
    }

    pub fn lat(&self) -> f64 {
        self.lat_e7 as f64 / 1e7
    }

    pub fn lon(&self) -> f64 {
        self.lon_e7 as f64 / 1e7
    }
}

impl fmt::Display for HomeLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:.7},{:.7}", self.lat(), self.lon())
    }
}

/// Parses `LAT,LON` in degrees (a full-width comma from a Chinese keyboard is accepted).
impl FromStr for HomeLocation {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let (lat, lon) = s
            .split_once([',', '，'])
            .ok_or_else(|| format!("{s:?} is not LAT,LON in degrees (e.g. 30.2592,120.1631)"))?;
        let lat: f64 = parse_degrees(lat, "latitude")?;
        let lon: f64 = parse_degrees(lon, "longitude")?;
        HomeLocation::from_degrees(lat, lon)
    }
}

fn parse_degrees(s: &str, what: &str) -> Result<f64, String> {
    s.trim()
        .parse::<f64>()
        .map_err(|_| format!("{what} {:?} is not a number of degrees", s.trim()))
}

impl Serialize for HomeLocation {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(Some(4))?;
        m.serialize_entry("lat", &self.lat())?;
        m.serialize_entry("lon", &self.lon())?;
        m.serialize_entry("lat_e7", &self.lat_e7)?;
        m.serialize_entry("lon_e7", &self.lon_e7)?;
        m.end()
    }
}

/// Normalizes and checks a phone number; the result is what is stored and matched on.
///
/// Separators (spaces, dashes, dots, parentheses) are dropped, and a `+86` / `0086` prefix
/// before a mainland mobile number is removed, so "+86 138-0000-0001" and "13800000001" are
/// one contact. Accepted: an 11-digit mainland mobile (13x–19x), a landline with its area
/// code (starting with 0, 10–12 digits), or `+` and a country code (8–15 digits, E.164).
pub fn parse_phone(raw: &str) -> Result<String, String> {
    let shown = raw.trim();
    let compact: String = shown
        .chars()
        .filter(|c| !matches!(c, ' ' | '-' | '.' | '(' | ')' | '\u{3000}'))
        .collect();
    let (plus, digits) = match compact.strip_prefix('+') {
        Some(d) => (true, d.to_string()),
        None => (false, compact.clone()),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!(
            "{shown:?} is not a phone number: use digits, optionally with a leading +"
        ));
    }
    let mainland = |d: &str| d.len() == 11 && d.starts_with('1');
    let (plus, digits) = if plus && digits.starts_with("86") && mainland(&digits[2..]) {
        (false, digits[2..].to_string())
    } else if !plus && digits.starts_with("0086") && mainland(&digits[4..]) {
        (false, digits[4..].to_string())
    } else {
        (plus, digits)
    };
    if plus {
        if (8..=15).contains(&digits.len()) {
            return Ok(format!("+{digits}"));
        }
        return Err(format!(
            "{shown:?} is not a phone number: + and a country code take 8 to 15 digits"
        ));
    }
    if digits.starts_with('1') {
        let ok = digits.len() == 11 && matches!(digits.as_bytes()[1], b'3'..=b'9');
        if ok {
            return Ok(digits);
        }
        return Err(format!(
            "{shown:?} is not a mobile number: mainland mobiles have 11 digits starting 13 to 19"
        ));
    }
    if digits.starts_with('0') {
        if (10..=12).contains(&digits.len()) {
            return Ok(digits);
        }
        return Err(format!(
            "{shown:?} is not a landline number: with its area code (e.g. 0571) it has 10 to 12 digits"
        ));
    }
    Err(format!(
        "{shown:?} is not a phone number: use an 11-digit mobile, a landline with its area code, or + and a country code"
    ))
}

pub fn parse_email(raw: &str) -> Result<String, String> {
    let s = raw.trim();
    let ok = s.len() <= 254
        && !s.chars().any(char::is_whitespace)
        && match s.split_once('@') {
            Some((local, domain)) => {
                !local.is_empty()
                    && !domain.contains('@')
                    && domain.contains('.')
                    && !domain.starts_with('.')
                    && !domain.ends_with('.')
            }
            None => false,
        };
    if ok {
        Ok(s.to_string())
    } else {
        Err(format!("{s:?} is not an email address"))
    }
}

/// A WeCom / DingTalk group-robot URL: must be http(s), since the notifier POSTs to it.
pub fn parse_webhook(raw: &str) -> Result<String, String> {
    let s = raw.trim();
    match url::Url::parse(s) {
        Ok(u) if (u.scheme() == "https" || u.scheme() == "http") && u.host().is_some() => {
            Ok(s.to_string())
        }
        _ => Err(format!("{s:?} is not an http(s) URL")),
    }
}

/// A birth date between 1900 and today, as office ledgers write it: `1945-03-02`,
/// `1945/3/2`, `1945.3.2`, `1945年3月2日`, `19450302` (full-width digits too), optionally
/// followed by a midnight time as spreadsheets export it (`1945/3/2 0:00`).
pub fn parse_birth_date(raw: &str) -> Result<NaiveDate, String> {
    let s = raw.trim();
    let d = parse_office_date(s).ok_or_else(|| {
        format!(
            "{s:?} is not a date: use YYYY-MM-DD (1945/3/2, 1945年3月2日 and 19450302 work too)"
        )
    })?;
    let earliest = NaiveDate::from_ymd_opt(1900, 1, 1).unwrap_or(NaiveDate::MIN);
    if d < earliest || d > Utc::now().date_naive() {
        return Err(format!("{s} is not a plausible birth date"));
    }
    Ok(d)
}

/// The date forms of [`parse_birth_date`], without the plausibility check.
pub fn parse_office_date(raw: &str) -> Option<NaiveDate> {
    let s = to_half_width(raw.trim());
    // "1945/3/2 0:00" or "1945-03-02 00:00:00": a date with a time of midnight.
    let s = match s.split_once(char::is_whitespace) {
        Some((date, time))
            if time
                .trim()
                .split(':')
                .all(|p| !p.is_empty() && p.bytes().all(|b| b == b'0')) =>
        {
            date.to_string()
        }
        _ => s,
    };
    let s = s
        .replace(['年', '月'], "-")
        .trim_end_matches(['日', '号'])
        .to_string();
    let parts: Vec<&str> = s.split(['-', '/', '.']).collect();
    let num = |p: &str, max_len: usize| -> Option<u32> {
        if p.is_empty() || p.len() > max_len || !p.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        p.parse().ok()
    };
    let (y, m, d) = match parts.as_slice() {
        [y, m, d] if y.len() == 4 => (num(y, 4)?, num(m, 2)?, num(d, 2)?),
        [compact] if compact.len() == 8 => (
            num(&compact[..4], 4)?,
            num(&compact[4..6], 2)?,
            num(&compact[6..], 2)?,
        ),
        _ => return None,
    };
    NaiveDate::from_ymd_opt(y as i32, m, d)
}

// ---------------------------------------------------------------------------------------
// Office files: encodings, full-width characters, list cells
// ---------------------------------------------------------------------------------------

/// Turns full-width ASCII (ＡＢＣ１２３，：) into its half-width form and the ideographic
/// and no-break spaces into plain spaces, as a Chinese keyboard or Excel may have typed them;
/// drops zero-width characters. Used on structured cells (ids, phones, dates, codes).
pub fn to_half_width(s: &str) -> String {
    s.chars()
        .filter(|c| !matches!(c, '\u{200B}' | '\u{200C}' | '\u{200D}' | '\u{FEFF}'))
        .map(|c| match c {
            '\u{FF01}'..='\u{FF5E}' => char::from_u32(c as u32 - 0xFEE0).unwrap_or(c),
            '\u{3000}' | '\u{00A0}' => ' ',
            _ => c,
        })
        .collect()
}

/// Trims every kind of space (ideographic, no-break) and drops zero-width characters,
/// leaving the text otherwise as typed. Used on free-text cells (names, addresses).
pub fn clean_text(s: &str) -> String {
    s.chars()
        .filter(|c| !matches!(c, '\u{200B}' | '\u{200C}' | '\u{200D}' | '\u{FEFF}'))
        .collect::<String>()
        .trim()
        .to_string()
}

/// Splits a list cell on `;`, `；` or `、`, trimming items and dropping empty ones.
pub fn split_list(s: &str) -> Vec<String> {
    s.split([';', '；', '、'])
        .map(clean_text)
        .filter(|x| !x.is_empty())
        .collect()
}

/// The text of an office file and how it was encoded.
#[derive(Debug, Clone)]
pub struct DecodedText {
    pub text: String,
    /// `UTF-8`, `UTF-16LE`, `UTF-16BE` or `GB18030` (which covers GBK and GB2312).
    pub encoding: &'static str,
}

/// Decodes a CSV or TOML file as offices save them: UTF-8 with or without a BOM, UTF-16 with
/// a BOM (Excel's "Unicode text"), or else GBK / GB18030 (Excel's plain "CSV" on a Chinese
/// Windows). A file that is none of these is refused with the line of the first bad byte.
pub fn decode_office_text(bytes: &[u8]) -> Result<DecodedText, ImportProblem> {
    if bytes.starts_with(b"PK\x03\x04") {
        return Err(problem(
            0,
            "file",
            "is an Excel workbook (.xlsx), not CSV: in Excel use Save As, \"CSV UTF-8\"",
        ));
    }
    if let Some((enc, bom_len)) = encoding_rs::Encoding::for_bom(bytes) {
        let (text, had_errors) = enc.decode_without_bom_handling(&bytes[bom_len..]);
        if had_errors {
            return Err(problem(
                0,
                "file",
                format!(
                    "starts with a {} byte-order mark but is not {}",
                    enc.name(),
                    enc.name()
                ),
            ));
        }
        return Ok(DecodedText {
            text: text.into_owned(),
            encoding: enc.name(),
        });
    }
    if let Ok(text) = std::str::from_utf8(bytes) {
        return Ok(DecodedText {
            text: text.to_string(),
            encoding: "UTF-8",
        });
    }
    if bytes.contains(&0) {
        return Err(problem(
            0,
            "file",
            "is binary, not a text (CSV or TOML) file",
        ));
    }
    let mut decoder = encoding_rs::GB18030.new_decoder_without_bom_handling();
    let mut text = String::with_capacity(bytes.len() * 3 / 2);
    let mut read = 0;
    loop {
        if let Some(need) = decoder.max_utf8_buffer_length_without_replacement(bytes.len() - read) {
            text.reserve(need);
        }
        let (result, n) =
            decoder.decode_to_string_without_replacement(&bytes[read..], &mut text, true);
        read += n;
        match result {
            encoding_rs::DecoderResult::InputEmpty => break,
            encoding_rs::DecoderResult::OutputFull => continue,
            encoding_rs::DecoderResult::Malformed(_, _) => {
                let line = bytes[..read].iter().filter(|b| **b == b'\n').count() + 1;
                return Err(problem(
                    line,
                    "file",
                    "is neither UTF-8 nor GBK/GB18030 text (save it as \"CSV UTF-8\")",
                ));
            }
        }
    }
    Ok(DecodedText {
        text,
        encoding: "GB18030",
    })
}

/// A resident identity number (身份证号): 18 characters with a valid GB 11643 check digit,
/// or the old 15-digit form. The check digit catches most typos before they reach a ledger.
pub fn parse_id_number(raw: &str) -> Result<String, String> {
    let s = raw.trim().to_ascii_uppercase();
    let b = s.as_bytes();
    if b.len() == 15 && b.iter().all(u8::is_ascii_digit) {
        return Ok(s);
    }
    if b.len() == 18
        && b[..17].iter().all(u8::is_ascii_digit)
        && (b[17].is_ascii_digit() || b[17] == b'X')
    {
        const WEIGHTS: [u32; 17] = [7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2];
        const CHECK: &[u8; 11] = b"10X98765432";
        let sum: u32 = b[..17]
            .iter()
            .zip(WEIGHTS)
            .map(|(d, w)| u32::from(d - b'0') * w)
            .sum();
        if CHECK[(sum % 11) as usize] == b[17] {
            return Ok(s);
        }
        return Err(format!(
            "{s:?} has a wrong check digit (last character): a typo?"
        ));
    }
    Err(format!(
        "{s:?} is not an identity number: 18 characters (digits, last may be X)"
    ))
}

/// Geofence radius in metres.
pub fn parse_radius_m(raw: &str) -> Result<i32, String> {
    let s = raw.trim();
    let r: i32 = s
        .parse()
        .map_err(|_| format!("{s:?} is not a whole number of metres"))?;
    check_radius(r)
}

fn check_radius(r: i32) -> Result<i32, String> {
    if (10..=100_000).contains(&r) {
        Ok(r)
    } else {
        Err(format!("{r} m is outside 10..100000 m"))
    }
}

/// Yes/no as ledgers write it: true/false, yes/no, y/n, 1/0, 是/否.
pub fn parse_yes_no(raw: &str) -> Result<bool, String> {
    match raw.trim().to_lowercase().as_str() {
        "true" | "yes" | "y" | "1" | "是" | "x" => Ok(true),
        "false" | "no" | "n" | "0" | "否" => Ok(false),
        other => Err(format!("{other:?} is not yes/no (use true or false)")),
    }
}

/// Guardian priority: 1 is told first.
pub fn parse_priority(raw: &str) -> Result<i32, String> {
    let s = raw.trim();
    let p: i32 = s
        .parse()
        .map_err(|_| format!("{s:?} is not a whole number"))?;
    check_priority(p)
}

fn check_priority(p: i32) -> Result<i32, String> {
    if (1..=99).contains(&p) {
        Ok(p)
    } else {
        Err(format!("priority {p} is outside 1..99"))
    }
}

fn check_text(field: &str, value: &str, max_chars: usize) -> Result<(), FieldProblem> {
    if value.chars().count() > max_chars {
        return Err(FieldProblem {
            field: field.into(),
            message: format!("longer than {max_chars} characters"),
        });
    }
    if value.chars().any(|c| c.is_control() && c != '\n') {
        return Err(FieldProblem {
            field: field.into(),
            message: "contains control characters".into(),
        });
    }
    Ok(())
}

fn check_name(field: &str, name: &str) -> Result<(), FieldProblem> {
    if name.trim().is_empty() {
        return Err(FieldProblem {
            field: field.into(),
            message: "is required".into(),
        });
    }
    check_text(field, name, 200)
}

fn check_ref(field: &str, r: &str) -> Result<(), FieldProblem> {
    if r.is_empty() || r.chars().count() > 100 || r.chars().any(char::is_control) {
        return Err(FieldProblem {
            field: field.into(),
            message: format!("{r:?} is not a reference: 1 to 100 printable characters"),
        });
    }
    Ok(())
}

/// Trims; an empty string means "not given".
fn clean(s: &Option<String>) -> Option<String> {
    s.as_deref()
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
}

// ---------------------------------------------------------------------------------------
// Thresholds
// ---------------------------------------------------------------------------------------

/// The vital-sign and wear rules an elder may override.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ThresholdKey {
    HrHigh,
    HrLow,
    Spo2Low,
    TempHigh,
    BpHigh,
    NotWorn,
    LowBattery,
    GeofenceExit,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Above,
    Below,
}

impl Direction {
    fn as_str(self) -> &'static str {
        match self {
            Direction::Above => "above",
            Direction::Below => "below",
        }
    }
}

impl ThresholdKey {
    pub const ALL: [ThresholdKey; 8] = [
        ThresholdKey::HrHigh,
        ThresholdKey::HrLow,
        ThresholdKey::Spo2Low,
        ThresholdKey::TempHigh,
        ThresholdKey::BpHigh,
        ThresholdKey::NotWorn,
        ThresholdKey::LowBattery,
        ThresholdKey::GeofenceExit,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ThresholdKey::HrHigh => "hr_high",
            ThresholdKey::HrLow => "hr_low",
            ThresholdKey::Spo2Low => "spo2_low",
            ThresholdKey::TempHigh => "temp_high",
            ThresholdKey::BpHigh => "bp_high",
            ThresholdKey::NotWorn => "not_worn",
            ThresholdKey::LowBattery => "low_battery",
            ThresholdKey::GeofenceExit => "geofence_exit",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        ThresholdKey::ALL.into_iter().find(|k| k.as_str() == s)
    }

    /// For vital signs: the comparison the rule must use, and a plausible range for its
    /// number (a typo like `"above": 1300` must not silently switch an alarm off).
    /// `None` for rules that are only a duration (not worn, geofence exit). The keys are
    /// exactly the engine's rules (`alerts::rules::VITAL_RULES`); silence is per device
    /// (`devices.heartbeat_interval_s` x `alerts.silence_factor`).
    pub fn limit_spec(self) -> Option<(Direction, f64, f64, &'static str)> {
        match self {
            ThresholdKey::HrHigh => Some((Direction::Above, 60.0, 220.0, "bpm")),
            ThresholdKey::HrLow => Some((Direction::Below, 25.0, 100.0, "bpm")),
            ThresholdKey::Spo2Low => Some((Direction::Below, 70.0, 99.0, "%")),
            ThresholdKey::TempHigh => Some((Direction::Above, 35.0, 42.0, "°C")),
            ThresholdKey::BpHigh => Some((Direction::Above, 100.0, 250.0, "mmHg systolic")),
            ThresholdKey::LowBattery => Some((Direction::Below, 5.0, 50.0, "%")),
            ThresholdKey::NotWorn | ThresholdKey::GeofenceExit => None,
        }
    }
}

impl fmt::Display for ThresholdKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One override: a limit (for vital signs) and how long it must hold.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ThresholdRule {
    /// `Some` for vital signs, in the direction [`ThresholdKey::limit_spec`] requires.
    pub limit: Option<(Direction, f64)>,
    /// How long the condition must last. Always given: the alert engine replaces its
    /// default rule with the override as a whole.
    pub sustain: Duration,
}

/// Per-elder threshold overrides, validated. Stored as JSON in `elders.thresholds`, e.g.
/// `{"hr_high": {"above": 120, "for": "5m"}, "geofence_exit": {"for": "30m"}}`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Thresholds(BTreeMap<ThresholdKey, ThresholdRule>);

const MAX_SUSTAIN: Duration = Duration::from_secs(24 * 3600);

impl Thresholds {
    pub fn get(&self, key: ThresholdKey) -> Option<&ThresholdRule> {
        self.0.get(&key)
    }

    pub fn iter(&self) -> impl Iterator<Item = (ThresholdKey, &ThresholdRule)> {
        self.0.iter().map(|(k, v)| (*k, v))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Validates a JSON object; every problem is returned, each starting with its key.
    pub fn from_json(v: &serde_json::Value) -> Result<Thresholds, Vec<String>> {
        let Some(obj) = v.as_object() else {
            return Err(vec![
                "must be a JSON object such as {\"hr_high\": {\"above\": 120, \"for\": \"5m\"}}"
                    .into(),
            ]);
        };
        let mut errors = Vec::new();
        let mut out = BTreeMap::new();
        for (name, rule) in obj {
            let Some(key) = ThresholdKey::parse(name) else {
                errors.push(format!(
                    "unknown threshold {name:?}: use one of {}",
                    ThresholdKey::ALL.map(ThresholdKey::as_str).join(", ")
                ));
                continue;
            };
            match parse_rule(key, rule) {
                Ok(r) => {
                    out.insert(key, r);
                }
                Err(mut e) => errors.append(&mut e),
            }
        }
        if errors.is_empty() {
            Ok(Thresholds(out))
        } else {
            Err(errors)
        }
    }

    /// The canonical JSON stored in the database (durations re-written by humantime).
    pub fn to_json(&self) -> serde_json::Value {
        let mut obj = serde_json::Map::new();
        for (key, rule) in &self.0 {
            let mut r = serde_json::Map::new();
            if let Some((dir, n)) = rule.limit {
                r.insert(dir.as_str().into(), json_number(n));
            }
            r.insert(
                "for".into(),
                humantime::format_duration(rule.sustain).to_string().into(),
            );
            obj.insert(key.as_str().into(), serde_json::Value::Object(r));
        }
        serde_json::Value::Object(obj)
    }
}

impl Serialize for Thresholds {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.to_json().serialize(s)
    }
}

/// Parses a JSON text of threshold overrides (the CLI's `--thresholds`).
pub fn parse_thresholds(s: &str) -> Result<Thresholds, String> {
    let v: serde_json::Value =
        serde_json::from_str(s).map_err(|e| format!("thresholds are not valid JSON: {e}"))?;
    Thresholds::from_json(&v).map_err(|e| e.join("; "))
}

fn json_number(n: f64) -> serde_json::Value {
    // Keep "120" an integer in the stored JSON when it was one.
    if n.fract() == 0.0 && n.abs() < 1e15 {
        serde_json::Value::from(n as i64)
    } else {
        serde_json::Value::from(n)
    }
}

fn parse_rule(key: ThresholdKey, rule: &serde_json::Value) -> Result<ThresholdRule, Vec<String>> {
    let k = key.as_str();
    let Some(fields) = rule.as_object() else {
        return Err(vec![format!(
            "{k}: must be an object like {{\"above\": 120, \"for\": \"2m\"}}"
        )]);
    };
    let mut errors = Vec::new();
    let mut limit: Option<(Direction, f64)> = None;
    let mut sustain = None;
    for (f, val) in fields {
        match f.as_str() {
            "above" | "below" => {
                let dir = if f == "above" {
                    Direction::Above
                } else {
                    Direction::Below
                };
                match val.as_f64() {
                    None => errors.push(format!("{k}: \"{f}\" must be a number, not {val}")),
                    Some(_) if limit.is_some() => {
                        errors.push(format!("{k}: give \"above\" or \"below\", not both"))
                    }
                    Some(n) => limit = Some((dir, n)),
                }
            }
            "for" => match val.as_str() {
                None => errors.push(format!(
                    "{k}: \"for\" must be a duration string such as \"2m\", not {val}"
                )),
                Some(s) => match humantime::parse_duration(s.trim()) {
                    Ok(d) if d.is_zero() => {
                        errors.push(format!("{k}: \"for\" must be longer than zero"))
                    }
                    Ok(d) if d > MAX_SUSTAIN => {
                        errors.push(format!("{k}: \"for\" {s:?} is longer than 24h"))
                    }
                    Ok(d) => sustain = Some(d),
                    Err(e) => errors.push(format!(
                        "{k}: \"for\" {s:?} is not a duration ({e}); use e.g. \"90s\", \"2m\", \"1h\""
                    )),
                },
            },
            other => errors.push(format!(
                "{k}: unknown field {other:?}: use \"above\" or \"below\", and \"for\""
            )),
        }
    }
    match key.limit_spec() {
        Some((want, lo, hi, unit)) => match limit {
            None if !fields.contains_key("above") && !fields.contains_key("below") => errors.push(
                format!("{k}: needs \"{}\": a number in {unit}", want.as_str()),
            ),
            None => {}
            Some((dir, _)) if dir != want => errors.push(format!(
                "{k}: use \"{}\", not \"{}\"",
                want.as_str(),
                dir.as_str()
            )),
            Some((dir, n)) if !(lo..=hi).contains(&n) => errors.push(format!(
                "{k}: {} {n} is outside {lo}..{hi} {unit}",
                dir.as_str()
            )),
            Some(_) => {}
        },
        None => {
            if limit.is_some() {
                errors.push(format!("{k}: takes only \"for\" (a duration)"));
            }
        }
    }
    if !fields.contains_key("for") {
        errors.push(format!(
            "{k}: needs \"for\", how long it must last (a duration such as \"2m\")"
        ));
    }
    match sustain {
        Some(sustain) if errors.is_empty() => Ok(ThresholdRule { limit, sustain }),
        _ => Err(errors),
    }
}

// ---------------------------------------------------------------------------------------
// Keys: how the CLI names an elder or a contact
// ---------------------------------------------------------------------------------------

/// An elder by database id (`42`) or by the ledger's reference (`ref:XH-0001`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ElderKey {
    Id(i64),
    Ref(String),
}

impl FromStr for ElderKey {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if let Some(r) = s.strip_prefix("ref:") {
            let r = r.trim();
            if r.is_empty() {
                return Err("ref: needs a reference after it".into());
            }
            return Ok(ElderKey::Ref(r.to_string()));
        }
        s.parse::<i64>()
            .map(ElderKey::Id)
            .map_err(|_| format!("{s:?} is not an elder: give its id (42) or ref:REF"))
    }
}

impl fmt::Display for ElderKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ElderKey::Id(id) => write!(f, "elder {id}"),
            ElderKey::Ref(r) => write!(f, "elder ref:{r}"),
        }
    }
}

/// A contact by id (`7`), reference (`ref:GW-01`) or phone (`phone:13800000001`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ContactKey {
    Id(i64),
    Ref(String),
    Phone(String),
}

impl FromStr for ContactKey {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if let Some(r) = s.strip_prefix("ref:") {
            let r = r.trim();
            if r.is_empty() {
                return Err("ref: needs a reference after it".into());
            }
            return Ok(ContactKey::Ref(r.to_string()));
        }
        if let Some(p) = s.strip_prefix("phone:") {
            return parse_phone(p).map(ContactKey::Phone);
        }
        s.parse::<i64>().map(ContactKey::Id).map_err(|_| {
            format!("{s:?} is not a contact: give its id (7), ref:REF or phone:NUMBER")
        })
    }
}

impl fmt::Display for ContactKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ContactKey::Id(id) => write!(f, "contact {id}"),
            ContactKey::Ref(r) => write!(f, "contact ref:{r}"),
            ContactKey::Phone(p) => write!(f, "contact phone:{p}"),
        }
    }
}

async fn resolve_elder<C: GenericClient + Sync>(
    c: &C,
    key: &ElderKey,
) -> Result<i64, RegistryError> {
    let row = match key {
        ElderKey::Id(id) => {
            c.query_opt("SELECT id FROM elders WHERE id = $1", &[id])
                .await?
        }
        ElderKey::Ref(r) => {
            c.query_opt("SELECT id FROM elders WHERE external_ref = $1", &[r])
                .await?
        }
    };
    row.map(|r| r.get(0))
        .ok_or_else(|| RegistryError::NotFound(key.to_string()))
}

async fn resolve_contact<C: GenericClient + Sync>(
    c: &C,
    key: &ContactKey,
) -> Result<i64, RegistryError> {
    let rows = match key {
        ContactKey::Id(id) => {
            c.query("SELECT id FROM contacts WHERE id = $1", &[id])
                .await?
        }
        ContactKey::Ref(r) => {
            c.query("SELECT id FROM contacts WHERE external_ref = $1", &[r])
                .await?
        }
        ContactKey::Phone(p) => {
            c.query("SELECT id FROM contacts WHERE phone = $1 ORDER BY id", &[p])
                .await?
        }
    };
    match rows.len() {
        0 => Err(RegistryError::NotFound(key.to_string())),
        1 => Ok(rows[0].get(0)),
        n => Err(RegistryError::Conflict(format!(
            "{n} contacts have {key}; name one by id"
        ))),
    }
}

// ---------------------------------------------------------------------------------------
// Elders
// ---------------------------------------------------------------------------------------

/// What `elder add` and the importer write. `None` fields are left as stored when the elder
/// already exists (matched by `external_ref`), and take the schema default for a new one.
#[derive(Debug, Clone, Default)]
pub struct NewElder {
    pub external_ref: Option<String>,
    pub name: String,
    pub id_number: Option<String>,
    pub birth_date: Option<NaiveDate>,
    pub phone: Option<String>,
    pub address: Option<String>,
    pub community: Option<String>,
    pub home: Option<HomeLocation>,
    pub home_radius_m: Option<i32>,
    pub wander_risk: Option<bool>,
    pub language: Option<Language>,
    pub thresholds: Option<Thresholds>,
    pub notes: Option<String>,
    /// The grid (网格) the elder lives in, by region code; it must be a `grid` region.
    pub region: Option<String>,
    pub gender: Option<Gender>,
    /// `Some` replaces the stored categories (an empty list clears them).
    pub categories: Option<Vec<Category>>,
    /// Chronic conditions, as the ledger names them; `Some` replaces the stored list.
    pub conditions: Option<Vec<String>>,
    /// Regular medication; `Some` replaces the stored list.
    pub medications: Option<Vec<String>>,
}

impl NewElder {
    /// Trims and normalizes every field; all problems are reported, each naming its field.
    pub fn validated(&self) -> Result<NewElder, Vec<FieldProblem>> {
        let mut problems = Vec::new();
        let mut out = self.clone();
        out.name = self.name.trim().to_string();
        if let Err(p) = check_name("name", &out.name) {
            problems.push(p);
        }
        out.external_ref = clean(&self.external_ref);
        if let Some(r) = &out.external_ref {
            if let Err(p) = check_ref("ref", r) {
                problems.push(p);
            }
        }
        let mut field = |name: &str, r: Result<String, String>| match r {
            Ok(v) => Some(v),
            Err(message) => {
                problems.push(FieldProblem {
                    field: name.into(),
                    message,
                });
                None
            }
        };
        out.id_number =
            clean(&self.id_number).and_then(|v| field("id_number", parse_id_number(&v)));
        out.phone = clean(&self.phone).and_then(|v| field("phone", parse_phone(&v)));
        out.address = clean(&self.address);
        out.community = clean(&self.community);
        out.notes = clean(&self.notes);
        for (name, value, max) in [
            ("address", &out.address, 500),
            ("community", &out.community, 200),
            ("notes", &out.notes, 4000),
        ] {
            if let Some(v) = value {
                if let Err(p) = check_text(name, v, max) {
                    problems.push(p);
                }
            }
        }
        if let Some(d) = self.birth_date {
            if let Err(message) = parse_birth_date(&d.format("%Y-%m-%d").to_string()) {
                problems.push(FieldProblem {
                    field: "birth_date".into(),
                    message,
                });
            }
        }
        if let Some(r) = self.home_radius_m {
            if let Err(message) = check_radius(r) {
                problems.push(FieldProblem {
                    field: "radius_m".into(),
                    message,
                });
            }
        }
        out.region = clean(&self.region).map(|r| to_half_width(&r).trim().to_string());
        if let Some(code) = &out.region {
            if let Err(message) = super::regions::check_code(code) {
                problems.push(FieldProblem {
                    field: "region".into(),
                    message,
                });
            }
        }
        for (name, list, slot) in [
            ("conditions", &self.conditions, &mut out.conditions),
            ("medications", &self.medications, &mut out.medications),
        ] {
            if let Some(items) = list {
                match check_text_list(items.clone()) {
                    Ok(v) => *slot = Some(v),
                    Err(message) => problems.push(FieldProblem {
                        field: name.into(),
                        message,
                    }),
                }
            }
        }
        if let Some(c) = &mut out.categories {
            c.sort();
            c.dedup();
        }
        if problems.is_empty() {
            Ok(out)
        } else {
            Err(problems)
        }
    }
}

/// An elder as stored, with the ids of the bracelets bound to them.
#[derive(Debug, Clone, Serialize)]
pub struct Elder {
    pub id: i64,
    pub external_ref: Option<String>,
    pub name: String,
    pub id_number: Option<String>,
    #[serde(serialize_with = "ser_date")]
    pub birth_date: Option<NaiveDate>,
    pub phone: Option<String>,
    pub address: Option<String>,
    pub community: Option<String>,
    pub home: Option<HomeLocation>,
    pub home_radius_m: i32,
    pub wander_risk: bool,
    pub language: Language,
    /// As stored; [`Elder::threshold_overrides`] gives the typed form.
    pub thresholds: serde_json::Value,
    pub notes: Option<String>,
    pub devices: Vec<String>,
    /// The grid the elder lives in (`regions.id`), its code and name.
    pub region_id: Option<i64>,
    pub region_code: Option<String>,
    pub region_name: Option<String>,
    /// Region names from the city down to the grid, e.g. `["杭州市", "湖滨街道",
    /// "东坡路社区", "东坡路第一网格"]`; empty without a region.
    pub region_path: Vec<String>,
    pub gender: Option<Gender>,
    pub categories: Vec<Category>,
    pub conditions: Vec<String>,
    pub medications: Vec<String>,
    #[serde(serialize_with = "ser_time")]
    pub created_at: DateTime<Utc>,
    #[serde(serialize_with = "ser_time")]
    pub updated_at: DateTime<Utc>,
}

impl Elder {
    /// The typed overrides. Only fails for JSON written around this module (by hand in SQL).
    pub fn threshold_overrides(&self) -> Result<Thresholds, Vec<String>> {
        Thresholds::from_json(&self.thresholds)
    }
}

fn ser_date<S: Serializer>(d: &Option<NaiveDate>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => s.serialize_str(&d.format("%Y-%m-%d").to_string()),
        None => s.serialize_none(),
    }
}

fn ser_time<S: Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
}

const ELDER_COLUMNS: &str = "e.id, e.external_ref, e.name, e.id_number, e.birth_date, e.phone,
    e.address, e.community, e.home_lat_e7, e.home_lon_e7, e.home_radius_m, e.wander_risk,
    e.language, e.thresholds, e.notes, e.created_at, e.updated_at,
    ARRAY(SELECT d.device_id FROM devices d WHERE d.elder_id = e.id ORDER BY d.device_id),
    e.region_id,
    (SELECT r.code FROM regions r WHERE r.id = e.region_id),
    (SELECT r.name FROM regions r WHERE r.id = e.region_id),
    ARRAY(SELECT a.name FROM regions r JOIN regions a ON left(r.path, length(a.path)) = a.path
          WHERE r.id = e.region_id ORDER BY length(a.path)),
    e.gender, e.categories, e.conditions, e.medications";

fn elder_from_row(r: &Row) -> Elder {
    let lat: Option<i32> = r.get(8);
    let lon: Option<i32> = r.get(9);
    let language: String = r.get(12);
    Elder {
        id: r.get(0),
        external_ref: r.get(1),
        name: r.get(2),
        id_number: r.get(3),
        birth_date: r.get(4),
        phone: r.get(5),
        address: r.get(6),
        community: r.get(7),
        home: lat
            .zip(lon)
            .map(|(lat_e7, lon_e7)| HomeLocation { lat_e7, lon_e7 }),
        home_radius_m: r.get(10),
        wander_risk: r.get(11),
        // The column's CHECK allows only the two languages.
        language: language.parse().unwrap_or_default(),
        thresholds: r.get(13),
        notes: r.get(14),
        created_at: r.get(15),
        updated_at: r.get(16),
        devices: r.get(17),
        region_id: r.get(18),
        region_code: r.get(19),
        region_name: r.get(20),
        region_path: r.get(21),
        // The columns' CHECKs admit only known values.
        gender: r.get::<_, Option<String>>(22).and_then(|g| g.parse().ok()),
        categories: r
            .get::<_, Vec<String>>(23)
            .iter()
            .filter_map(|c| c.parse().ok())
            .collect(),
        conditions: r.get(24),
        medications: r.get(25),
    }
}

/// The id of the grid region with this code; any other level (or no such code) is refused
/// naming the `region` field, since elders live in grids.
pub async fn resolve_grid<C: GenericClient + Sync>(
    c: &C,
    code: &str,
) -> Result<i64, RegistryError> {
    let row = c
        .query_opt("SELECT id, level FROM regions WHERE code = $1", &[&code])
        .await?;
    match row {
        None => Err(RegistryError::invalid(
            "region",
            format!("no region has code {code:?}: add it with `silverguard region add` or import the regions first"),
        )),
        Some(r) => {
            let level: String = r.get(1);
            if level == "grid" {
                Ok(r.get(0))
            } else {
                Err(RegistryError::invalid(
                    "region",
                    format!("{code} is a {level}, not a grid: an elder's region is the grid (网格) they live in"),
                ))
            }
        }
    }
}

fn strs<T: Copy>(v: &Option<Vec<T>>, f: fn(T) -> &'static str) -> Option<Vec<&'static str>> {
    v.as_ref().map(|v| v.iter().map(|x| f(*x)).collect())
}

/// The id of an upserted record and what happened to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Upserted {
    pub id: i64,
    /// Inserted now.
    pub created: bool,
    /// An existing record whose stored values changed (false when it already matched, so a
    /// re-import leaves `updated_at` alone and reports "unchanged").
    pub changed: bool,
}

/// Adds an elder, or updates the one with the same `external_ref` (only the fields given).
/// Without a ref it always inserts: give a ref when a script may run twice.
pub async fn upsert_elder(pool: &Pool, elder: &NewElder) -> Result<Upserted, RegistryError> {
    let v = elder.validated().map_err(RegistryError::invalid_all)?;
    let client = pool.get().await?;
    upsert_elder_in(&**client, &v).await
}

async fn upsert_elder_in<C: GenericClient + Sync>(
    c: &C,
    v: &NewElder,
) -> Result<Upserted, RegistryError> {
    let lat = v.home.map(|h| h.lat_e7);
    let lon = v.home.map(|h| h.lon_e7);
    let language = v.language.map(Language::as_str);
    let thresholds = v.thresholds.as_ref().map(Thresholds::to_json);
    let region_id = match &v.region {
        Some(code) => Some(resolve_grid(c, code).await?),
        None => None,
    };
    let gender = v.gender.map(Gender::as_str);
    let categories = strs(&v.categories, Category::as_str);
    let row = c
        .query_opt(
            "INSERT INTO elders (external_ref, name, id_number, birth_date, phone, address,
                 community, home_lat_e7, home_lon_e7, home_radius_m, wander_risk, language,
                 thresholds, notes, region_id, gender, categories, conditions, medications)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, coalesce($10, 300),
                 coalesce($11, false), coalesce($12, 'zh-CN'), coalesce($13, '{}'::jsonb), $14,
                 $15, $16, coalesce($17::text[], '{}'), coalesce($18::text[], '{}'),
                 coalesce($19::text[], '{}'))
             ON CONFLICT (external_ref) DO UPDATE SET
                 name = $2,
                 id_number = coalesce($3, elders.id_number),
                 birth_date = coalesce($4, elders.birth_date),
                 phone = coalesce($5, elders.phone),
                 address = coalesce($6, elders.address),
                 community = coalesce($7, elders.community),
                 home_lat_e7 = coalesce($8, elders.home_lat_e7),
                 home_lon_e7 = coalesce($9, elders.home_lon_e7),
                 home_radius_m = coalesce($10, elders.home_radius_m),
                 wander_risk = coalesce($11, elders.wander_risk),
                 language = coalesce($12, elders.language),
                 thresholds = coalesce($13, elders.thresholds),
                 notes = coalesce($14, elders.notes),
                 region_id = coalesce($15, elders.region_id),
                 gender = coalesce($16, elders.gender),
                 categories = coalesce($17::text[], elders.categories),
                 conditions = coalesce($18::text[], elders.conditions),
                 medications = coalesce($19::text[], elders.medications),
                 updated_at = now()
             WHERE (elders.name, elders.id_number, elders.birth_date, elders.phone,
                    elders.address, elders.community, elders.home_lat_e7, elders.home_lon_e7,
                    elders.home_radius_m, elders.wander_risk, elders.language,
                    elders.thresholds, elders.notes, elders.region_id, elders.gender,
                    elders.categories, elders.conditions, elders.medications)
               IS DISTINCT FROM
                   ($2, coalesce($3, elders.id_number), coalesce($4, elders.birth_date),
                    coalesce($5, elders.phone), coalesce($6, elders.address),
                    coalesce($7, elders.community), coalesce($8, elders.home_lat_e7),
                    coalesce($9, elders.home_lon_e7), coalesce($10, elders.home_radius_m),
                    coalesce($11, elders.wander_risk), coalesce($12, elders.language),
                    coalesce($13, elders.thresholds), coalesce($14, elders.notes),
                    coalesce($15, elders.region_id), coalesce($16, elders.gender),
                    coalesce($17::text[], elders.categories),
                    coalesce($18::text[], elders.conditions),
                    coalesce($19::text[], elders.medications))
             RETURNING id, (xmax = 0)",
            &[
                &v.external_ref,
                &v.name,
                &v.id_number,
                &v.birth_date,
                &v.phone,
                &v.address,
                &v.community,
                &lat,
                &lon,
                &v.home_radius_m,
                &v.wander_risk,
                &language,
                &thresholds,
                &v.notes,
                &region_id,
                &gender,
                &categories,
                &v.conditions,
                &v.medications,
            ],
        )
        .await?;
    match row {
        Some(row) => {
            let created: bool = row.get(1);
            Ok(Upserted {
                id: row.get(0),
                created,
                changed: !created,
            })
        }
        // The conflict's update found nothing to change, so no row came back.
        None => {
            let id: i64 = c
                .query_one(
                    "SELECT id FROM elders WHERE external_ref = $1",
                    &[&v.external_ref],
                )
                .await?
                .get(0);
            Ok(Upserted {
                id,
                created: false,
                changed: false,
            })
        }
    }
}

pub async fn get_elder(pool: &Pool, key: &ElderKey) -> Result<Elder, RegistryError> {
    let client = pool.get().await?;
    let row = match key {
        ElderKey::Id(id) => {
            client
                .query_opt(
                    &format!("SELECT {ELDER_COLUMNS} FROM elders e WHERE e.id = $1"),
                    &[id],
                )
                .await?
        }
        ElderKey::Ref(r) => {
            client
                .query_opt(
                    &format!("SELECT {ELDER_COLUMNS} FROM elders e WHERE e.external_ref = $1"),
                    &[r],
                )
                .await?
        }
    };
    row.map(|r| elder_from_row(&r))
        .ok_or_else(|| RegistryError::NotFound(key.to_string()))
}

/// Elders by id, optionally only those of one community.
pub async fn list_elders(
    pool: &Pool,
    community: Option<&str>,
    limit: i64,
) -> Result<Vec<Elder>, RegistryError> {
    let filter = ElderFilter {
        community: community.map(str::to_string),
        ..Default::default()
    };
    find_elders(pool, &filter, limit).await
}

/// Which elders [`find_elders`] returns; every condition given must hold.
#[derive(Debug, Clone, Default)]
pub struct ElderFilter {
    /// The `community` text, exactly.
    pub community: Option<String>,
    /// A region code: elders whose grid lies in that region's subtree (a city, a township,
    /// a community or a grid). An unknown code is `NotFound`.
    pub region: Option<String>,
    pub category: Option<Category>,
}

/// Elders by id matching a filter.
pub async fn find_elders(
    pool: &Pool,
    filter: &ElderFilter,
    limit: i64,
) -> Result<Vec<Elder>, RegistryError> {
    let client = pool.get().await?;
    let region_path: Option<String> = match &filter.region {
        None => None,
        Some(code) => Some(
            client
                .query_opt("SELECT path FROM regions WHERE code = $1", &[&code.trim()])
                .await?
                .map(|r| r.get(0))
                .ok_or_else(|| RegistryError::NotFound(format!("region {}", code.trim())))?,
        ),
    };
    let category = filter.category.map(Category::as_str);
    let rows = client
        .query(
            &format!(
                "SELECT {ELDER_COLUMNS} FROM elders e
                 WHERE ($1::text IS NULL OR e.community = $1)
                   AND ($2::text IS NULL OR EXISTS (
                        SELECT 1 FROM regions r
                        WHERE r.id = e.region_id AND left(r.path, length($2)) = $2))
                   AND ($3::text IS NULL OR $3 = ANY(e.categories))
                 ORDER BY e.id LIMIT $4"
            ),
            &[&filter.community, &region_path, &category, &limit],
        )
        .await?;
    Ok(rows.iter().map(elder_from_row).collect())
}

/// Removes an elder and their contact links; their bracelets stay provisioned, unbound, and
/// their telemetry stays (it is keyed by device). Returns the removed elder's id.
pub async fn remove_elder(pool: &Pool, key: &ElderKey) -> Result<i64, RegistryError> {
    remove_elder_as(pool, key, "cli").await
}

/// [`remove_elder`], recording `actor` as who closed the elder's open device bindings.
pub async fn remove_elder_as(
    pool: &Pool,
    key: &ElderKey,
    actor: &str,
) -> Result<i64, RegistryError> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    let id = resolve_elder(&*tx, key).await?;
    let bound: Vec<String> = tx
        .query(
            "SELECT device_id FROM devices WHERE elder_id = $1 ORDER BY device_id",
            &[&id],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    for d in &bound {
        super::devices::unbind_in(&*tx, d, actor).await?;
    }
    tx.execute("DELETE FROM elders WHERE id = $1", &[&id])
        .await?;
    tx.commit().await?;
    Ok(id)
}

/// A partial update of an elder: `None` leaves a field as it is.
#[derive(Debug, Clone, Default)]
pub struct ElderPatch {
    pub name: Option<String>,
    pub external_ref: Option<String>,
    pub id_number: Option<String>,
    pub birth_date: Option<NaiveDate>,
    pub phone: Option<String>,
    pub address: Option<String>,
    pub community: Option<String>,
    /// `Some(None)` clears the home location (and so the geofence).
    pub home: Option<Option<HomeLocation>>,
    pub home_radius_m: Option<i32>,
    pub wander_risk: Option<bool>,
    pub language: Option<Language>,
    pub thresholds: Option<Thresholds>,
    pub notes: Option<String>,
    /// A grid's code; `Some(None)` takes the elder out of any region.
    pub region: Option<Option<String>>,
    pub gender: Option<Gender>,
    /// Replaces the categories (an empty list clears them).
    pub categories: Option<Vec<Category>>,
    /// Replaces the conditions (an empty list clears them).
    pub conditions: Option<Vec<String>>,
    /// Replaces the medications (an empty list clears them).
    pub medications: Option<Vec<String>>,
}

/// Applies a patch in one statement; every field is validated first.
pub async fn update_elder(
    pool: &Pool,
    key: &ElderKey,
    patch: &ElderPatch,
) -> Result<i64, RegistryError> {
    // Reuse NewElder's validation: a placeholder name keeps `name` out of it when absent.
    let probe = NewElder {
        external_ref: patch.external_ref.clone(),
        name: patch.name.clone().unwrap_or_else(|| "-".into()),
        id_number: patch.id_number.clone(),
        birth_date: patch.birth_date,
        phone: patch.phone.clone(),
        address: patch.address.clone(),
        community: patch.community.clone(),
        home_radius_m: patch.home_radius_m,
        notes: patch.notes.clone(),
        region: patch.region.clone().flatten(),
        conditions: patch.conditions.clone(),
        medications: patch.medications.clone(),
        ..Default::default()
    };
    let v = probe.validated().map_err(RegistryError::invalid_all)?;
    let name = patch.name.as_ref().map(|_| v.name.clone());
    let set_home = patch.home.is_some();
    let home = patch.home.flatten();
    let lat = home.map(|h| h.lat_e7);
    let lon = home.map(|h| h.lon_e7);
    let language = patch.language.map(Language::as_str);
    let thresholds = patch.thresholds.as_ref().map(Thresholds::to_json);
    let set_region = patch.region.is_some();
    let gender = patch.gender.map(Gender::as_str);
    let categories = strs(&patch.categories, Category::as_str);
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    let id = resolve_elder(&*tx, key).await?;
    let region_id = match &v.region {
        Some(code) => Some(resolve_grid(&*tx, code).await?),
        None => None,
    };
    tx.execute(
        "UPDATE elders SET
             name = coalesce($2, name),
             external_ref = coalesce($3, external_ref),
             id_number = coalesce($4, id_number),
             birth_date = coalesce($5, birth_date),
             phone = coalesce($6, phone),
             address = coalesce($7, address),
             community = coalesce($8, community),
             home_lat_e7 = CASE WHEN $9 THEN $10 ELSE home_lat_e7 END,
             home_lon_e7 = CASE WHEN $9 THEN $11 ELSE home_lon_e7 END,
             home_radius_m = coalesce($12, home_radius_m),
             wander_risk = coalesce($13, wander_risk),
             language = coalesce($14, language),
             thresholds = coalesce($15, thresholds),
             notes = coalesce($16, notes),
             region_id = CASE WHEN $17 THEN $18 ELSE region_id END,
             gender = coalesce($19, gender),
             categories = coalesce($20::text[], categories),
             conditions = coalesce($21::text[], conditions),
             medications = coalesce($22::text[], medications),
             updated_at = now()
         WHERE id = $1",
        &[
            &id,
            &name,
            &v.external_ref,
            &v.id_number,
            &v.birth_date,
            &v.phone,
            &v.address,
            &v.community,
            &set_home,
            &lat,
            &lon,
            &v.home_radius_m,
            &patch.wander_risk,
            &language,
            &thresholds,
            &v.notes,
            &set_region,
            &region_id,
            &gender,
            &categories,
            &v.conditions,
            &v.medications,
        ],
    )
    .await
    .map_err(|e| unique_ref_conflict(e, &v.external_ref))?;
    tx.commit().await?;
    Ok(id)
}

fn unique_ref_conflict(e: tokio_postgres::Error, r: &Option<String>) -> RegistryError {
    if e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION) {
        if let Some(r) = r {
            return RegistryError::Conflict(format!("ref {r:?} already belongs to another record"));
        }
    }
    e.into()
}

/// Sets (or with `None` clears) the home location; `radius_m` changes the geofence radius.
pub async fn set_home(
    pool: &Pool,
    key: &ElderKey,
    home: Option<HomeLocation>,
    radius_m: Option<i32>,
) -> Result<i64, RegistryError> {
    let patch = ElderPatch {
        home: Some(home),
        home_radius_m: radius_m,
        ..Default::default()
    };
    update_elder(pool, key, &patch).await
}

/// Whether leaving the home geofence raises an alert for this elder.
pub async fn set_wander_risk(
    pool: &Pool,
    key: &ElderKey,
    wander_risk: bool,
) -> Result<i64, RegistryError> {
    let patch = ElderPatch {
        wander_risk: Some(wander_risk),
        ..Default::default()
    };
    update_elder(pool, key, &patch).await
}

pub async fn set_language(
    pool: &Pool,
    key: &ElderKey,
    language: Language,
) -> Result<i64, RegistryError> {
    let patch = ElderPatch {
        language: Some(language),
        ..Default::default()
    };
    update_elder(pool, key, &patch).await
}

/// Replaces the elder's threshold overrides (an empty set restores every default).
pub async fn set_thresholds(
    pool: &Pool,
    key: &ElderKey,
    thresholds: &Thresholds,
) -> Result<i64, RegistryError> {
    let patch = ElderPatch {
        thresholds: Some(thresholds.clone()),
        ..Default::default()
    };
    update_elder(pool, key, &patch).await
}

/// What binding a bracelet changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BindOutcome {
    pub elder_id: i64,
    /// The device was not provisioned and `provision` allowed creating it.
    pub provisioned: bool,
    /// The elder the device was bound to before, when it was another one.
    pub previous_elder: Option<i64>,
}

/// Binds a bracelet to an elder (its telemetry and events are then theirs), moving it from
/// whoever had it. The change is kept in `device_bindings` with `actor` (who did it: a user
/// name, `cli`, `import`). An unknown device is an error unless `provision` is set: a
/// mistyped IMEI must not silently become a device.
pub async fn bind_device(
    pool: &Pool,
    elder: &ElderKey,
    device_id: &str,
    provision: bool,
    actor: &str,
) -> Result<BindOutcome, RegistryError> {
    let device_id = device_id.trim();
    if !is_valid_device_id(device_id) {
        return Err(RegistryError::invalid(
            "device",
            format!("{device_id:?} is not a device id: use 1 to 64 of A-Z a-z 0-9 _ -"),
        ));
    }
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    let elder_id = resolve_elder(&*tx, elder).await?;
    let mut provisioned = false;
    let rebind = match super::devices::bind_in(&*tx, device_id, elder_id, actor).await? {
        Some(r) => r,
        None if provision => {
            tx.execute(
                "INSERT INTO devices (device_id) VALUES ($1) ON CONFLICT (device_id) DO NOTHING",
                &[&device_id],
            )
            .await?;
            provisioned = true;
            super::devices::bind_in(&*tx, device_id, elder_id, actor)
                .await?
                .ok_or_else(|| RegistryError::NotProvisioned(device_id.to_string()))?
        }
        None => return Err(RegistryError::NotProvisioned(device_id.to_string())),
    };
    tx.commit().await?;
    Ok(BindOutcome {
        elder_id,
        provisioned,
        previous_elder: rebind.previous_elder.filter(|p| *p != elder_id),
    })
}

/// Unbinds a bracelet from whoever wore it, recording `actor`; returns that elder's id, if
/// any. `NotFound` for a device that is not provisioned.
pub async fn unbind_device(
    pool: &Pool,
    device_id: &str,
    actor: &str,
) -> Result<Option<i64>, RegistryError> {
    let device_id = device_id.trim();
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    let previous = super::devices::unbind_in(&*tx, device_id, actor)
        .await?
        .ok_or_else(|| RegistryError::NotFound(format!("device {device_id}")))?;
    tx.commit().await?;
    Ok(previous)
}

// ---------------------------------------------------------------------------------------
// Contacts
// ---------------------------------------------------------------------------------------

/// What `contact add` and the importer write; `None` fields keep what is stored.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NewContact {
    pub external_ref: Option<String>,
    pub name: String,
    pub phone: Option<String>,
    pub email: Option<String>,
    pub language: Option<Language>,
    pub im_webhook: Option<String>,
}

impl NewContact {
    pub fn validated(&self) -> Result<NewContact, Vec<FieldProblem>> {
        let mut problems = Vec::new();
        let name = self.name.trim().to_string();
        if let Err(p) = check_name("name", &name) {
            problems.push(p);
        }
        let external_ref = clean(&self.external_ref);
        if let Some(r) = &external_ref {
            if let Err(p) = check_ref("ref", r) {
                problems.push(p);
            }
        }
        let mut field = |name: &str, r: Result<String, String>| match r {
            Ok(v) => Some(v),
            Err(message) => {
                problems.push(FieldProblem {
                    field: name.into(),
                    message,
                });
                None
            }
        };
        let phone = clean(&self.phone).and_then(|v| field("phone", parse_phone(&v)));
        let email = clean(&self.email).and_then(|v| field("email", parse_email(&v)));
        let im_webhook =
            clean(&self.im_webhook).and_then(|v| field("im_webhook", parse_webhook(&v)));
        if problems.is_empty() {
            Ok(NewContact {
                external_ref,
                name,
                phone,
                email,
                language: self.language,
                im_webhook,
            })
        } else {
            Err(problems)
        }
    }
}

/// A contact as stored, with the number of elders they answer for.
#[derive(Debug, Clone, Serialize)]
pub struct Contact {
    pub id: i64,
    pub external_ref: Option<String>,
    pub name: String,
    pub phone: Option<String>,
    pub email: Option<String>,
    pub language: Language,
    pub im_webhook: Option<String>,
    pub elders: i64,
}

/// Adds a contact, or updates the one with the same `external_ref`, or else the same phone.
pub async fn upsert_contact(pool: &Pool, contact: &NewContact) -> Result<Upserted, RegistryError> {
    let v = contact.validated().map_err(RegistryError::invalid_all)?;
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&REGISTRY_LOCK])
        .await?;
    let up = upsert_contact_in(&*tx, &v).await?;
    tx.commit().await?;
    Ok(up)
}

/// Finds the contact by ref, else by phone, and updates it; inserts when there is none.
/// Callers hold [`REGISTRY_LOCK`] so that "not found, insert" cannot race another writer.
async fn upsert_contact_in<C: GenericClient + Sync>(
    c: &C,
    v: &NewContact,
) -> Result<Upserted, RegistryError> {
    let by_ref: Option<i64> = match &v.external_ref {
        Some(r) => c
            .query_opt("SELECT id FROM contacts WHERE external_ref = $1", &[r])
            .await?
            .map(|row| row.get(0)),
        None => None,
    };
    let by_phone: Vec<(i64, Option<String>)> = match &v.phone {
        Some(p) => c
            .query(
                "SELECT id, external_ref FROM contacts WHERE phone = $1 ORDER BY id",
                &[p],
            )
            .await?
            .iter()
            .map(|row| (row.get(0), row.get(1)))
            .collect(),
        None => Vec::new(),
    };
    let phone = v.phone.as_deref().unwrap_or_default();
    let target = match by_ref {
        Some(id) => {
            // The same phone on two people would make de-duplication (and SMS) ambiguous.
            if let Some((other, _)) = by_phone.iter().find(|(pid, _)| *pid != id) {
                return Err(RegistryError::Conflict(format!(
                    "phone {phone} already belongs to contact {other}, not to ref {:?}",
                    v.external_ref.as_deref().unwrap_or_default()
                )));
            }
            Some(id)
        }
        None => match by_phone.as_slice() {
            [] => None,
            [(id, existing_ref)] => {
                if let (Some(want), Some(have)) = (&v.external_ref, existing_ref) {
                    return Err(RegistryError::Conflict(format!(
                        "phone {phone} belongs to contact {id} with ref {have:?}, not {want:?}"
                    )));
                }
                Some(*id)
            }
            many => {
                return Err(RegistryError::Conflict(format!(
                    "{} contacts share phone {phone} (ids {}); remove the duplicates first",
                    many.len(),
                    many.iter()
                        .map(|(id, _)| id.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                )))
            }
        },
    };
    let language = v.language.map(Language::as_str);
    match target {
        Some(id) => {
            let n = c
                .execute(
                    "UPDATE contacts SET name = $2,
                     external_ref = coalesce($3, external_ref),
                     phone = coalesce($4, phone),
                     email = coalesce($5, email),
                     language = coalesce($6, language),
                     im_webhook = coalesce($7, im_webhook),
                     updated_at = now()
                 WHERE id = $1
                   AND (name, external_ref, phone, email, language, im_webhook)
                       IS DISTINCT FROM
                       ($2, coalesce($3, external_ref), coalesce($4, phone),
                        coalesce($5, email), coalesce($6, language),
                        coalesce($7, im_webhook))",
                    &[
                        &id,
                        &v.name,
                        &v.external_ref,
                        &v.phone,
                        &v.email,
                        &language,
                        &v.im_webhook,
                    ],
                )
                .await?;
            Ok(Upserted {
                id,
                created: false,
                changed: n > 0,
            })
        }
        None => {
            let id: i64 = c
                .query_one(
                    "INSERT INTO contacts (external_ref, name, phone, email, language, im_webhook)
                     VALUES ($1, $2, $3, $4, coalesce($5, 'zh-CN'), $6) RETURNING id",
                    &[
                        &v.external_ref,
                        &v.name,
                        &v.phone,
                        &v.email,
                        &language,
                        &v.im_webhook,
                    ],
                )
                .await?
                .get(0);
            Ok(Upserted {
                id,
                created: true,
                changed: false,
            })
        }
    }
}

pub async fn list_contacts(pool: &Pool, limit: i64) -> Result<Vec<Contact>, RegistryError> {
    let client = pool.get().await?;
    let rows = client
        .query(
            "SELECT c.id, c.external_ref, c.name, c.phone, c.email, c.language, c.im_webhook,
                    (SELECT count(DISTINCT ec.elder_id) FROM elder_contacts ec
                     WHERE ec.contact_id = c.id)
             FROM contacts c ORDER BY c.id LIMIT $1",
            &[&limit],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| {
            let language: String = r.get(5);
            Contact {
                id: r.get(0),
                external_ref: r.get(1),
                name: r.get(2),
                phone: r.get(3),
                email: r.get(4),
                language: language.parse().unwrap_or_default(),
                im_webhook: r.get(6),
                elders: r.get(7),
            }
        })
        .collect())
}

/// What removing a contact left behind.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RemovedContact {
    pub id: i64,
    pub links_removed: u64,
    /// Elders for whom this was the only grid worker: nobody local is told of their SOS now.
    pub elders_without_grid_worker: Vec<i64>,
}

pub async fn remove_contact(
    pool: &Pool,
    key: &ContactKey,
) -> Result<RemovedContact, RegistryError> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    let id = resolve_contact(&*tx, key).await?;
    let orphans: Vec<i64> = tx
        .query(
            "SELECT ec.elder_id FROM elder_contacts ec
             WHERE ec.contact_id = $1 AND ec.role = 'grid_worker'
               AND NOT EXISTS (SELECT 1 FROM elder_contacts o
                               WHERE o.elder_id = ec.elder_id AND o.role = 'grid_worker'
                                 AND o.contact_id <> $1)
             ORDER BY ec.elder_id",
            &[&id],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let links_removed = tx
        .execute("DELETE FROM elder_contacts WHERE contact_id = $1", &[&id])
        .await?;
    tx.execute("DELETE FROM contacts WHERE id = $1", &[&id])
        .await?;
    tx.commit().await?;
    Ok(RemovedContact {
        id,
        links_removed,
        elders_without_grid_worker: orphans,
    })
}

/// Makes a contact answer for an elder in a role; linking again changes the priority.
/// `priority` defaults to 1 (told first).
pub async fn link_contact(
    pool: &Pool,
    elder: &ElderKey,
    contact: &ContactKey,
    role: Role,
    priority: Option<i32>,
) -> Result<(), RegistryError> {
    if let Some(p) = priority {
        check_priority(p).map_err(|m| RegistryError::invalid("priority", m))?;
    }
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    let elder_id = resolve_elder(&*tx, elder).await?;
    let contact_id = resolve_contact(&*tx, contact).await?;
    tx.execute(
        "INSERT INTO elder_contacts (elder_id, contact_id, role, priority)
         VALUES ($1, $2, $3, coalesce($4, 1))
         ON CONFLICT (elder_id, contact_id, role)
         DO UPDATE SET priority = coalesce($4, elder_contacts.priority)",
        &[&elder_id, &contact_id, &role.as_str(), &priority],
    )
    .await?;
    tx.commit().await?;
    Ok(())
}

/// Removes a contact's link to an elder, in one role or (with `None`) in all; returns how
/// many links were removed (zero is reported as not found).
pub async fn unlink_contact(
    pool: &Pool,
    elder: &ElderKey,
    contact: &ContactKey,
    role: Option<Role>,
) -> Result<u64, RegistryError> {
    let client = pool.get().await?;
    let elder_id = resolve_elder(&**client, elder).await?;
    let contact_id = resolve_contact(&**client, contact).await?;
    let n = client
        .execute(
            "DELETE FROM elder_contacts
             WHERE elder_id = $1 AND contact_id = $2 AND ($3::text IS NULL OR role = $3)",
            &[&elder_id, &contact_id, &role.map(Role::as_str)],
        )
        .await?;
    if n == 0 {
        return Err(RegistryError::NotFound(format!(
            "a link between {elder} and {contact}{}",
            role.map(|r| format!(" as {r}")).unwrap_or_default()
        )));
    }
    Ok(n)
}

// ---------------------------------------------------------------------------------------
// Who answers
// ---------------------------------------------------------------------------------------

/// One person to tell, with everything a channel needs to reach them.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Responder {
    pub id: i64,
    pub name: String,
    pub phone: Option<String>,
    pub email: Option<String>,
    pub language: Language,
    pub im_webhook: Option<String>,
    pub priority: i32,
}

/// Everyone who answers for an elder, by role; each list is sorted by priority (1 first),
/// then by contact id, so the order is stable between calls.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Responders {
    pub grid_workers: Vec<Responder>,
    pub backup_grid_workers: Vec<Responder>,
    pub guardians: Vec<Responder>,
    pub community_supervisors: Vec<Responder>,
    pub township_supervisors: Vec<Responder>,
}

impl Responders {
    pub fn role(&self, role: Role) -> &[Responder] {
        match role {
            Role::GridWorker => &self.grid_workers,
            Role::BackupGridWorker => &self.backup_grid_workers,
            Role::Guardian => &self.guardians,
            Role::CommunitySupervisor => &self.community_supervisors,
            Role::TownshipSupervisor => &self.township_supervisors,
        }
    }

    fn role_mut(&mut self, role: Role) -> &mut Vec<Responder> {
        match role {
            Role::GridWorker => &mut self.grid_workers,
            Role::BackupGridWorker => &mut self.backup_grid_workers,
            Role::Guardian => &mut self.guardians,
            Role::CommunitySupervisor => &mut self.community_supervisors,
            Role::TownshipSupervisor => &mut self.township_supervisors,
        }
    }

    pub fn is_empty(&self) -> bool {
        Role::ALL.iter().all(|r| self.role(*r).is_empty())
    }
}

/// Who answers for an elder. `NotFound` when the elder does not exist (an elder with no
/// contacts gives empty lists, which the alert engine must treat as "tell a supervisor").
pub async fn who_answers(pool: &Pool, elder_id: i64) -> Result<Responders, RegistryError> {
    let client = pool.get().await?;
    who_answers_with(&**client, elder_id).await
}

/// [`who_answers`] on a given connection or transaction, so the alert engine can read the
/// responders in the same transaction that writes the alert and its outbox rows.
pub async fn who_answers_with<C: GenericClient + Sync>(
    c: &C,
    elder_id: i64,
) -> Result<Responders, RegistryError> {
    // One round trip; the LEFT JOINs tell "no such elder" (no row) from "no contacts".
    let rows = c
        .query(
            "SELECT ec.role, c.id, c.name, c.phone, c.email, c.language, c.im_webhook,
                    ec.priority
             FROM elders e
             LEFT JOIN elder_contacts ec ON ec.elder_id = e.id
             LEFT JOIN contacts c ON c.id = ec.contact_id
             WHERE e.id = $1
             ORDER BY ec.role, ec.priority, c.id",
            &[&elder_id],
        )
        .await?;
    if rows.is_empty() {
        return Err(RegistryError::NotFound(format!("elder {elder_id}")));
    }
    let mut out = Responders::default();
    for r in &rows {
        let Some(role) = r.get::<_, Option<String>>(0) else {
            continue;
        };
        let Ok(role) = role.parse::<Role>() else {
            continue; // the column's CHECK admits only known roles
        };
        let language: String = r.get(5);
        out.role_mut(role).push(Responder {
            id: r.get(1),
            name: r.get(2),
            phone: r.get(3),
            email: r.get(4),
            language: language.parse().unwrap_or_default(),
            im_webhook: r.get(6),
            priority: r.get(7),
        });
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------
// Import
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImportFormat {
    Csv,
    Toml,
}

impl ImportFormat {
    pub fn from_path(path: &Path) -> Option<Self> {
        let ext = path.extension()?.to_str()?.to_ascii_lowercase();
        match ext.as_str() {
            "csv" => Some(ImportFormat::Csv),
            "toml" => Some(ImportFormat::Toml),
            _ => None,
        }
    }
}

impl FromStr for ImportFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "csv" => Ok(ImportFormat::Csv),
            "toml" => Ok(ImportFormat::Toml),
            other => Err(format!("unknown import format {other:?}: use csv or toml")),
        }
    }
}

/// A problem in an import file. `line` is 1-based; 0 means the file as a whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportProblem {
    pub line: usize,
    pub field: String,
    pub message: String,
}

impl fmt::Display for ImportProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}: {}", self.field, self.message)
        } else {
            write!(f, "line {}, {}: {}", self.line, self.field, self.message)
        }
    }
}

/// A validated import, ready to write. Contacts appear once however many elders they serve.
#[derive(Debug, Clone, Default)]
pub struct ImportPlan {
    pub elders: Vec<PlannedElder>,
    pub contacts: Vec<PlannedContact>,
}

#[derive(Debug, Clone)]
pub struct PlannedElder {
    pub line: usize,
    pub elder: NewElder,
    pub links: Vec<PlannedLink>,
    pub devices: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlannedLink {
    /// Index into [`ImportPlan::contacts`].
    pub contact: usize,
    pub role: Role,
    pub priority: i32,
}

#[derive(Debug, Clone)]
pub struct PlannedContact {
    /// Where the contact first appears.
    pub line: usize,
    pub contact: NewContact,
}

/// What an import did (or, for a dry run, would do).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ImportSummary {
    pub dry_run: bool,
    pub elders_created: u64,
    pub elders_updated: u64,
    pub elders_unchanged: u64,
    pub contacts_created: u64,
    pub contacts_updated: u64,
    pub contacts_unchanged: u64,
    /// Links added or whose priority changed.
    pub links_set: u64,
    /// Links of imported elders that the file no longer lists.
    pub links_removed: u64,
    pub links_unchanged: u64,
    pub devices_provisioned: u64,
    /// Existing devices now bound to a different elder (or bound for the first time).
    pub devices_bound: u64,
    pub devices_unchanged: u64,
    /// Worth a look, not fatal: e.g. an elder with no grid worker.
    pub warnings: Vec<String>,
}

/// Reads, parses and validates an import file without touching the database.
pub fn read_import_file(
    path: &Path,
    format: Option<ImportFormat>,
) -> Result<ImportPlan, RegistryError> {
    let shown = path.display().to_string();
    let format = format.or_else(|| ImportFormat::from_path(path)).ok_or_else(|| {
        RegistryError::invalid(
            "file",
            format!("{shown}: cannot tell the format from the extension; use .csv or .toml (or --format)"),
        )
    })?;
    let text = read_office_file(path)?;
    parse_import(&text, format).map_err(|problems| RegistryError::Import {
        path: shown,
        problems,
    })
}

/// Reads a file and decodes it as [`decode_office_text`] does (UTF-8 with or without BOM,
/// UTF-16 with BOM, GBK / GB18030).
pub fn read_office_file(path: &Path) -> Result<String, RegistryError> {
    let shown = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|source| RegistryError::Read {
        path: shown.clone(),
        source,
    })?;
    decode_office_text(&bytes)
        .map(|d| d.text)
        .map_err(|p| RegistryError::Import {
            path: shown,
            problems: vec![p],
        })
}

/// Parses and validates import text (already decoded; a BOM is ignored). All problems are
/// returned, each with its line and field (for CSV, the column as the file names it).
pub fn parse_import(text: &str, format: ImportFormat) -> Result<ImportPlan, Vec<ImportProblem>> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let (raw, shown) = match format {
        ImportFormat::Csv => parse_csv(text)?,
        ImportFormat::Toml => (parse_toml(text)?, HashMap::new()),
    };
    plan_import(raw).map_err(|mut problems| {
        for p in &mut problems {
            if let Some(s) = shown.get(&p.field) {
                p.field = s.clone();
            }
        }
        problems
    })
}

/// Reads an import file and writes it in one transaction (rolled back for a dry run).
pub async fn import_file(
    pool: &Pool,
    path: &Path,
    format: Option<ImportFormat>,
    dry_run: bool,
) -> Result<ImportSummary, RegistryError> {
    let plan = read_import_file(path, format)?;
    apply_import(pool, &plan, &path.display().to_string(), dry_run).await
}

/// A cell as read, with where it was.
#[derive(Debug, Clone)]
struct Cell {
    text: String,
    line: usize,
}

#[derive(Debug, Clone)]
enum RawJson {
    Text(String),
    Json(serde_json::Value),
}

#[derive(Debug, Default)]
struct RawElder {
    line: usize,
    cells: BTreeMap<&'static str, Cell>,
    thresholds: Option<(RawJson, usize)>,
    devices: Vec<Cell>,
    contacts: Vec<RawContact>,
}

#[derive(Debug, Default)]
struct RawContact {
    line: usize,
    /// Prefix that turns a contact field into the file's name for it:
    /// `guardian1_` (CSV) or `contacts[2].` (TOML).
    prefix: String,
    role: Option<Cell>,
    /// Known from the column name (CSV) when there is no `role` cell.
    fixed_role: Option<Role>,
    priority: Option<Cell>,
    default_priority: i32,
    cells: BTreeMap<&'static str, Cell>,
}

const ELDER_FIELDS: [&str; 18] = [
    "ref",
    "name",
    "id_number",
    "birth_date",
    "phone",
    "address",
    "community",
    "home_lat",
    "home_lon",
    "radius_m",
    "wander_risk",
    "language",
    "notes",
    "gender",
    "region",
    "categories",
    "conditions",
    "medications",
];

/// Elder fields holding lists (`;`, `；` or `、` between items in CSV; arrays in TOML).
const LIST_FIELDS: [&str; 3] = ["categories", "conditions", "medications"];

/// Fields that are codes, numbers, dates or flags: full-width characters are folded to
/// ASCII before parsing. Free text (names, addresses, notes, conditions) is only trimmed.
const STRUCTURED_FIELDS: [&str; 16] = [
    "ref",
    "id_number",
    "birth_date",
    "phone",
    "home_lat",
    "home_lon",
    "radius_m",
    "wander_risk",
    "language",
    "gender",
    "region",
    "categories",
    "email",
    "im_webhook",
    "role",
    "priority",
];

const CONTACT_FIELDS: [&str; 6] = ["ref", "name", "phone", "email", "language", "im_webhook"];

fn elder_field(name: &str) -> Option<&'static str> {
    ELDER_FIELDS.into_iter().find(|f| *f == name)
}

fn contact_field(name: &str) -> Option<&'static str> {
    CONTACT_FIELDS.into_iter().find(|f| *f == name)
}

/// A cell's text as the validators want it: structured fields folded to half-width.
fn normalized(field: &str, text: &str) -> String {
    if STRUCTURED_FIELDS.contains(&field) {
        clean_text(&to_half_width(text))
    } else {
        clean_text(text)
    }
}

/// Maps byte offsets to 1-based line numbers.
struct LineIndex(Vec<usize>);

impl LineIndex {
    fn new(text: &str) -> Self {
        let mut starts = vec![0];
        starts.extend(text.match_indices('\n').map(|(i, _)| i + 1));
        LineIndex(starts)
    }

    fn line(&self, offset: usize) -> usize {
        self.0.partition_point(|&s| s <= offset)
    }
}

pub(crate) fn problem(
    line: usize,
    field: impl Into<String>,
    message: impl Into<String>,
) -> ImportProblem {
    ImportProblem {
        line,
        field: field.into(),
        message: message.into(),
    }
}

// --- CSV as offices write it -------------------------------------------------------------

/// A CSV file as rows of trimmed cells, with the header found.
#[derive(Debug, Clone)]
pub(crate) struct CsvTable {
    pub header_line: usize,
    /// Normalized header names ([`normalize_header`]); empty for an unnamed column.
    pub headers: Vec<String>,
    /// The header cells as written (trimmed), for messages.
    pub raw_headers: Vec<String>,
    /// Data rows after the header; blank rows and `#` comment rows are left out.
    pub rows: Vec<CsvRow>,
}

#[derive(Debug, Clone)]
pub(crate) struct CsvRow {
    pub line: usize,
    pub cells: Vec<String>,
}

/// A header cell normalized for matching: full-width folded, lower case, inner spaces and
/// dashes as `_`, a trailing `*` (required-column marker) and a trailing bracketed note
/// (`出生日期(年-月-日)`) dropped.
pub(crate) fn normalize_header(h: &str) -> String {
    let mut s = to_half_width(h).trim().to_lowercase();
    loop {
        let before = s.len();
        s = s.trim_end_matches('*').trim().to_string();
        if s.ends_with(')') {
            if let Some(open) = s.rfind('(') {
                if open > 0 {
                    s.truncate(open);
                    s = s.trim().to_string();
                }
            }
        }
        if s.len() == before {
            break;
        }
    }
    s.split_whitespace()
        .collect::<Vec<_>>()
        .join("_")
        .replace('-', "_")
}

/// Reads CSV text into rows. The header is the first row unless that row is a title (one
/// filled cell) above a row that names at least two known columns (`known` is asked with
/// normalized names): ledgers often carry a title line such as "东坡路社区独居老人台账".
/// Unnamed columns are ignored when empty throughout (Excel's trailing commas) and
/// reported when they hold data.
pub(crate) fn read_csv_table(
    text: &str,
    known: impl Fn(&str) -> bool,
) -> Result<CsvTable, Vec<ImportProblem>> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    // The csv crate numbers lines wrongly after a CRLF (Windows, Excel): count on LF only.
    let text = text.replace("\r\n", "\n").replace('\r', "\n");
    let mut rdr = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .comment(Some(b'#'))
        .from_reader(text.as_bytes());
    let mut problems = Vec::new();
    let mut rows = Vec::new();
    for result in rdr.records() {
        match result {
            Ok(record) => {
                let line = record.position().map(|p| p.line() as usize).unwrap_or(0);
                let cells: Vec<String> = record.iter().map(clean_text).collect();
                if cells.iter().all(String::is_empty) {
                    continue;
                }
                rows.push(CsvRow { line, cells });
            }
            Err(e) => {
                let line = e.position().map(|p| p.line() as usize).unwrap_or(0);
                problems.push(problem(line, "row", e.to_string()));
            }
        }
    }
    if rows.is_empty() {
        problems.push(problem(
            1,
            "header",
            "the file has no header row (and no data)",
        ));
        return Err(problems);
    }
    let known_count = |r: &CsvRow| {
        r.cells
            .iter()
            .filter(|c| !c.is_empty() && known(&normalize_header(c)))
            .count()
    };
    let filled = |r: &CsvRow| r.cells.iter().filter(|c| !c.is_empty()).count();
    let mut header_at = 0;
    if known_count(&rows[0]) < 2 {
        for (i, r) in rows.iter().enumerate().take(6).skip(1) {
            if filled(&rows[i - 1]) > 1 {
                break;
            }
            if known_count(r) >= 2 {
                header_at = i;
                break;
            }
        }
    }
    let mut rows = rows.split_off(header_at);
    let header = rows.remove(0);
    let raw_headers = header.cells.clone();
    let headers: Vec<String> = raw_headers.iter().map(|h| normalize_header(h)).collect();
    for (i, h) in headers.iter().enumerate() {
        if h.is_empty() {
            if let Some(r) = rows
                .iter()
                .find(|r| r.cells.get(i).is_some_and(|c| !c.is_empty()))
            {
                problems.push(problem(
                    r.line,
                    format!("column {}", i + 1),
                    "holds data but has no name in the header",
                ));
            }
        }
    }
    for r in &rows {
        if r.cells.len() > headers.len()
            && r.cells.iter().skip(headers.len()).any(|c| !c.is_empty())
        {
            problems.push(problem(
                r.line,
                "row",
                format!(
                    "has {} cells but the header has {} columns (a comma inside a cell needs quotes)",
                    r.cells.len(),
                    headers.len()
                ),
            ));
        }
    }
    if problems.is_empty() {
        Ok(CsvTable {
            header_line: header.line,
            headers,
            raw_headers,
            rows,
        })
    } else {
        Err(problems)
    }
}

/// The English field of a Chinese (or alternative English) elder column name.
fn elder_alias(h: &str) -> Option<&'static str> {
    Some(match h {
        "编号" | "老人编号" | "档案编号" | "档案号" | "台账编号" | "elder_ref" => {
            "ref"
        }
        "姓名" | "老人姓名" => "name",
        "身份证号" | "身份证号码" | "身份证" | "公民身份号码" => "id_number",
        "出生日期" | "出生年月日" | "生日" | "birthday" | "dob" => "birth_date",
        "性别" | "sex" => "gender",
        "电话" | "联系电话" | "手机" | "手机号" | "手机号码" | "本人电话" | "老人电话" => {
            "phone"
        }
        "住址" | "地址" | "家庭住址" | "居住地址" | "现住址" => "address",
        "社区" | "所属社区" | "村/社区" | "社区/村" | "村" => "community",
        "网格" | "所属网格" | "网格编码" | "网格编号" | "网格代码" | "grid" | "region_code" => {
            "region"
        }
        "类别" | "人员类别" | "老人类别" | "类型" | "老人类型" | "category" => {
            "categories"
        }
        "疾病" | "慢性病" | "健康状况" | "病史" | "既往病史" | "condition" => {
            "conditions"
        }
        "用药" | "药物" | "常用药" | "用药情况" | "medication" => "medications",
        "纬度" | "lat" => "home_lat",
        "经度" | "lon" | "lng" => "home_lon",
        "围栏半径" | "半径" => "radius_m",
        "走失风险" | "防走失" => "wander_risk",
        "语言" => "language",
        "设备" | "手环" | "设备号" | "设备编号" | "手环编号" | "手环imei" | "设备imei" | "imei" => {
            "devices"
        }
        "备注" => "notes",
        "阈值" => "thresholds",
        _ => return None,
    })
}

/// The English column of a Chinese contact column: `<role><field>`, e.g. 网格员电话 →
/// `grid_worker_phone`, 监护人2姓名 → `guardian2_name`; a bare role (网格员) is its name.
fn contact_alias(h: &str) -> Option<String> {
    const ROLES: [(&str, &str); 9] = [
        ("备用网格员", "backup_grid_worker"),
        ("后备网格员", "backup_grid_worker"),
        ("网格员", "grid_worker"),
        ("监护人", "guardian"),
        ("社区负责人", "community_supervisor"),
        ("社区主任", "community_supervisor"),
        ("乡镇负责人", "township_supervisor"),
        ("街道负责人", "township_supervisor"),
        ("乡镇街道负责人", "township_supervisor"),
    ];
    let (rest, role) = ROLES
        .iter()
        .find_map(|(zh, en)| h.strip_prefix(zh).map(|rest| (rest, *en)))?;
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    let rest = rest[digits.len()..].trim_start_matches('_');
    let prefix = match (role, digits.as_str()) {
        ("guardian", "") => "guardian1".to_string(),
        ("guardian", n) => format!("guardian{n}"),
        (_, "") => role.to_string(),
        _ => return None,
    };
    let field = match rest {
        "" | "姓名" | "name" => "name",
        "电话" | "手机" | "联系电话" | "手机号" | "phone" => "phone",
        "邮箱" | "电子邮箱" | "email" => "email",
        "语言" | "language" => "language",
        "编号" | "ref" => "ref",
        _ => return None,
    };
    Some(format!("{prefix}_{field}"))
}

/// The canonical (English) column name for a normalized header, when there is one.
fn canonical_elder_header(h: &str) -> Option<String> {
    if csv_column(h).is_some() {
        return Some(h.to_string());
    }
    if let Some(f) = elder_alias(h) {
        return Some(f.to_string());
    }
    contact_alias(h).filter(|c| csv_column(c).is_some())
}

enum CsvColumn {
    Elder(&'static str),
    Thresholds,
    Devices,
    Contact {
        prefix: String,
        role: Role,
        priority: i32,
        field: &'static str,
    },
}

fn csv_column(header: &str) -> Option<CsvColumn> {
    if let Some(f) = elder_field(header) {
        return Some(CsvColumn::Elder(f));
    }
    match header {
        "thresholds" => return Some(CsvColumn::Thresholds),
        "devices" => return Some(CsvColumn::Devices),
        _ => {}
    }
    let (prefix, field) = CONTACT_FIELDS.into_iter().find_map(|f| {
        header
            .strip_suffix(f)
            .and_then(|p| p.strip_suffix('_'))
            .map(|p| (p, f))
    })?;
    let (role, priority) = match prefix {
        "grid_worker" => (Role::GridWorker, 1),
        "backup_grid_worker" => (Role::BackupGridWorker, 1),
        "community_supervisor" => (Role::CommunitySupervisor, 1),
        "township_supervisor" => (Role::TownshipSupervisor, 1),
        "guardian" => (Role::Guardian, 1),
        p => {
            let n: i32 = p.strip_prefix("guardian")?.parse().ok()?;
            if !(1..=99).contains(&n) {
                return None;
            }
            (Role::Guardian, n)
        }
    };
    Some(CsvColumn::Contact {
        prefix: format!("{prefix}_"),
        role,
        priority,
        field,
    })
}

/// Which kind of records a CSV holds, told from its header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CsvKind {
    Elders,
    Regions,
    Devices,
}

impl FromStr for CsvKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "elders" | "elder" => Ok(CsvKind::Elders),
            "regions" | "region" => Ok(CsvKind::Regions),
            "devices" | "device" => Ok(CsvKind::Devices),
            other => Err(format!(
                "unknown kind {other:?}: use elders, regions or devices"
            )),
        }
    }
}

/// Tells a regions file (code, level, parent_code) and a devices file (device_id / imei
/// without a name) from an elders ledger, by the header.
pub fn detect_csv_kind(text: &str) -> CsvKind {
    let known = |h: &str| {
        canonical_elder_header(h).is_some()
            || super::regions::region_column(h).is_some()
            || super::devices::device_column(h).is_some()
    };
    let headers: Vec<String> = match read_csv_table(text, known) {
        Ok(t) => t.headers,
        // A file with bad rows still has a header: the first line that is not blank.
        Err(_) => text
            .trim_start_matches('\u{feff}')
            .lines()
            .find(|l| !l.trim().is_empty() && !l.starts_with('#'))
            .map(|l| l.split(',').map(normalize_header).collect())
            .unwrap_or_default(),
    };
    let region_col = |name: &str| {
        headers
            .iter()
            .any(|h| super::regions::region_column(h) == Some(name))
    };
    if region_col("level") && region_col("code") {
        return CsvKind::Regions;
    }
    let elder_name = headers
        .iter()
        .any(|h| canonical_elder_header(h).as_deref() == Some("name"));
    let device_id = headers.iter().any(|h| {
        matches!(
            super::devices::device_column(h),
            Some("device_id") | Some("imei")
        )
    });
    if device_id && !elder_name {
        return CsvKind::Devices;
    }
    CsvKind::Elders
}

/// Parses an elders CSV. Also returns, for problem messages, each canonical column name
/// mapped to the header as written when they differ (出生日期 for `birth_date`).
/// Rows of an elders CSV, and the header as written for each canonical column name.
type ParsedCsv = (Vec<RawElder>, HashMap<String, String>);

fn parse_csv(text: &str) -> Result<ParsedCsv, Vec<ImportProblem>> {
    let table = read_csv_table(text, |h| canonical_elder_header(h).is_some())?;
    let header_line = table.header_line;
    let mut problems = Vec::new();
    let mut columns = Vec::with_capacity(table.headers.len());
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut shown: HashMap<String, String> = HashMap::new();
    for (i, h) in table.headers.iter().enumerate() {
        if h.is_empty() {
            columns.push(None); // empty throughout, or read_csv_table reported it
            continue;
        }
        let raw = &table.raw_headers[i];
        let Some(canonical) = canonical_elder_header(h) else {
            problems.push(problem(
                header_line,
                raw.clone(),
                "unknown column (see docs/registry.md for the columns)",
            ));
            columns.push(None);
            continue;
        };
        if let Some(first) = seen.insert(canonical.clone(), i + 1) {
            problems.push(problem(
                header_line,
                canonical.clone(),
                format!("column appears twice (columns {first} and {})", i + 1),
            ));
        }
        if *raw != canonical {
            shown.insert(canonical.clone(), format!("{raw} ({canonical})"));
        }
        columns.push(csv_column(&canonical));
    }
    for required in ["ref", "name"] {
        if !seen.contains_key(required) {
            problems.push(problem(header_line, required, "required column is missing"));
        }
    }
    if !problems.is_empty() {
        // Rows cannot be read sensibly against a broken header.
        return Err(problems);
    }
    let mut out = Vec::new();
    for record in &table.rows {
        let line = record.line;
        let mut elder = RawElder {
            line,
            ..Default::default()
        };
        for (col, cell) in columns.iter().zip(record.cells.iter()) {
            if cell.is_empty() {
                continue;
            }
            let cell_of = || Cell {
                text: cell.to_string(),
                line,
            };
            match col {
                None => {}
                Some(CsvColumn::Elder(f)) => {
                    elder.cells.insert(f, cell_of());
                }
                Some(CsvColumn::Thresholds) => {
                    elder.thresholds = Some((RawJson::Text(cell.to_string()), line));
                }
                Some(CsvColumn::Devices) => {
                    // Ids never contain separators, so commas and line breaks (Alt+Enter
                    // in Excel) work as well as semicolons.
                    elder.devices.extend(
                        cell.split([';', '；', '、', ',', '，', '\n', '/'])
                            .map(|d| clean_text(&to_half_width(d)))
                            .filter(|d| !d.is_empty())
                            .map(|d| Cell { text: d, line }),
                    );
                }
                Some(CsvColumn::Contact {
                    prefix,
                    role,
                    priority,
                    field,
                }) => {
                    let idx = match elder.contacts.iter().position(|c| &c.prefix == prefix) {
                        Some(i) => i,
                        None => {
                            elder.contacts.push(RawContact {
                                line,
                                prefix: prefix.clone(),
                                fixed_role: Some(*role),
                                default_priority: *priority,
                                ..Default::default()
                            });
                            elder.contacts.len() - 1
                        }
                    };
                    elder.contacts[idx].cells.insert(field, cell_of());
                }
            }
        }
        out.push(elder);
    }
    if problems.is_empty() {
        Ok((out, shown))
    } else {
        Err(problems)
    }
}

// --- TOML -----------------------------------------------------------------------------

fn parse_toml(text: &str) -> Result<Vec<RawElder>, Vec<ImportProblem>> {
    use toml::de::{DeTable, DeValue};
    let lines = LineIndex::new(text);
    let root = DeTable::parse(text).map_err(|e| {
        let line = e.span().map(|s| lines.line(s.start)).unwrap_or(0);
        vec![problem(line, "toml", e.message().trim().to_string())]
    })?;
    let mut problems = Vec::new();
    let mut out = Vec::new();
    for (key, value) in root.get_ref().iter() {
        let key_line = lines.line(key.span().start);
        if key.get_ref().as_ref() != "elders" {
            problems.push(problem(
                key_line,
                key.get_ref().to_string(),
                "unknown top-level key: the file holds [[elders]] tables",
            ));
            continue;
        }
        let Some(items) = value.get_ref().as_array() else {
            problems.push(problem(key_line, "elders", "must be [[elders]] tables"));
            continue;
        };
        for item in items.iter() {
            let line = lines.line(item.span().start);
            let Some(table) = item.get_ref().as_table() else {
                problems.push(problem(line, "elders", "each entry must be a table"));
                continue;
            };
            // The table's span starts at its first key; its [[elders]] header is the line
            // before that, but the first key's line is where an operator looks.
            let mut elder = RawElder {
                line,
                ..Default::default()
            };
            for (k, v) in table.iter() {
                let name = k.get_ref().as_ref();
                let vline = lines.line(k.span().start);
                match name {
                    "contacts" => {
                        let Some(arr) = v.get_ref().as_array() else {
                            problems.push(problem(vline, "contacts", "must be an array of tables"));
                            continue;
                        };
                        for (i, c) in arr.iter().enumerate() {
                            let cline = lines.line(c.span().start);
                            let prefix = format!("contacts[{i}].");
                            let Some(ct) = c.get_ref().as_table() else {
                                problems.push(problem(
                                    cline,
                                    format!("contacts[{i}]"),
                                    "must be a table",
                                ));
                                continue;
                            };
                            let mut contact = RawContact {
                                line: cline,
                                prefix: prefix.clone(),
                                default_priority: 1,
                                ..Default::default()
                            };
                            for (ck, cv) in ct.iter() {
                                let cname = ck.get_ref().as_ref();
                                let fline = lines.line(ck.span().start);
                                let Some(text) = scalar_text(cv.get_ref()) else {
                                    problems.push(problem(
                                        fline,
                                        format!("{prefix}{cname}"),
                                        "must be a single value",
                                    ));
                                    continue;
                                };
                                let cell = Cell { text, line: fline };
                                match cname {
                                    "role" => contact.role = Some(cell),
                                    "priority" => contact.priority = Some(cell),
                                    other => match contact_field(other) {
                                        Some(f) => {
                                            contact.cells.insert(f, cell);
                                        }
                                        None => problems.push(problem(
                                            fline,
                                            format!("{prefix}{other}"),
                                            "unknown field (use role, priority, name, phone, email, language, im_webhook, ref)",
                                        )),
                                    },
                                }
                            }
                            elder.contacts.push(contact);
                        }
                    }
                    "devices" => match v.get_ref() {
                        DeValue::Array(arr) => {
                            for d in arr.iter() {
                                match scalar_text(d.get_ref()) {
                                    Some(text) => elder.devices.push(Cell {
                                        text,
                                        line: lines.line(d.span().start),
                                    }),
                                    None => problems.push(problem(
                                        vline,
                                        "devices",
                                        "must be a list of device ids",
                                    )),
                                }
                            }
                        }
                        other => match scalar_text(other) {
                            Some(text) => elder.devices.push(Cell { text, line: vline }),
                            None => problems.push(problem(
                                vline,
                                "devices",
                                "must be a list of device ids",
                            )),
                        },
                    },
                    "thresholds" => {
                        let raw = match v.get_ref() {
                            DeValue::String(s) => RawJson::Text(s.to_string()),
                            other => RawJson::Json(de_to_json(other)),
                        };
                        elder.thresholds = Some((raw, vline));
                    }
                    other => match elder_field(other) {
                        Some(f) if LIST_FIELDS.contains(&f) => match v.get_ref() {
                            DeValue::Array(arr) => {
                                let items: Option<Vec<String>> =
                                    arr.iter().map(|x| scalar_text(x.get_ref())).collect();
                                match items {
                                    Some(items) => {
                                        elder.cells.insert(
                                            f,
                                            Cell {
                                                text: items.join(";"),
                                                line: vline,
                                            },
                                        );
                                    }
                                    None => problems.push(problem(
                                        vline,
                                        other,
                                        "must be a list of strings",
                                    )),
                                }
                            }
                            other_value => match scalar_text(other_value) {
                                Some(text) => {
                                    elder.cells.insert(f, Cell { text, line: vline });
                                }
                                None => problems.push(problem(
                                    vline,
                                    other,
                                    "must be a list of strings",
                                )),
                            },
                        },
                        Some(f) => match scalar_text(v.get_ref()) {
                            Some(text) => {
                                elder.cells.insert(f, Cell { text, line: vline });
                            }
                            None => problems.push(problem(vline, other, "must be a single value")),
                        },
                        None => problems.push(problem(
                            vline,
                            other,
                            "unknown field (see docs/registry.md for the fields)",
                        )),
                    },
                }
            }
            out.push(elder);
        }
    }
    if problems.is_empty() {
        Ok(out)
    } else {
        Err(problems)
    }
}

/// A TOML scalar as the text a CSV cell would hold, so both formats share one validator.
fn scalar_text(v: &toml::de::DeValue<'_>) -> Option<String> {
    use toml::de::DeValue;
    match v {
        DeValue::String(s) => Some(s.trim().to_string()),
        DeValue::Integer(i) => {
            let digits = i.as_str().replace('_', "");
            i64::from_str_radix(&digits, i.radix())
                .ok()
                .map(|n| n.to_string())
        }
        DeValue::Float(f) => Some(f.as_str().replace('_', "")),
        DeValue::Boolean(b) => Some(b.to_string()),
        DeValue::Datetime(d) => Some(d.to_string()),
        DeValue::Array(_) | DeValue::Table(_) => None,
    }
}

fn de_to_json(v: &toml::de::DeValue<'_>) -> serde_json::Value {
    use toml::de::DeValue;
    match v {
        DeValue::String(s) => serde_json::Value::String(s.to_string()),
        DeValue::Integer(_) | DeValue::Float(_) => scalar_text(v)
            .and_then(|t| t.parse::<f64>().ok())
            .map(json_number)
            .unwrap_or(serde_json::Value::Null),
        DeValue::Boolean(b) => serde_json::Value::Bool(*b),
        DeValue::Datetime(d) => serde_json::Value::String(d.to_string()),
        DeValue::Array(a) => {
            serde_json::Value::Array(a.iter().map(|x| de_to_json(x.get_ref())).collect())
        }
        DeValue::Table(t) => serde_json::Value::Object(
            t.iter()
                .map(|(k, x)| (k.get_ref().to_string(), de_to_json(x.get_ref())))
                .collect(),
        ),
    }
}

// --- Validation shared by both formats --------------------------------------------------

fn plan_import(raw: Vec<RawElder>) -> Result<ImportPlan, Vec<ImportProblem>> {
    let mut problems = Vec::new();
    let mut plan = ImportPlan::default();
    let mut refs: HashMap<String, usize> = HashMap::new();
    let mut device_owner: HashMap<String, (String, usize)> = HashMap::new();
    // Contacts are one per phone (or per ref when a contact has no phone).
    let mut contact_index: HashMap<String, usize> = HashMap::new();
    let mut ref_to_key: HashMap<String, String> = HashMap::new();

    for r in raw {
        let mut p = |line: usize, field: &str, message: String| {
            problems.push(problem(line, field, message))
        };
        let text = |f: &str| {
            r.cells
                .get(f)
                .map(|c| normalized(f, &c.text))
                .filter(|t| !t.is_empty())
        };
        let line_of = |f: &str| r.cells.get(f).map(|c| c.line).unwrap_or(r.line);

        let external_ref = text("ref");
        match &external_ref {
            None => p(
                r.line,
                "ref",
                "is required in an import, so that running it again updates instead of duplicating"
                    .into(),
            ),
            Some(x) => {
                if let Some(first) = refs.insert(x.clone(), line_of("ref")) {
                    p(
                        line_of("ref"),
                        "ref",
                        format!("{x:?} is also on line {first}"),
                    );
                }
            }
        }
        let ok = |f: &str, res: Result<(), String>, p: &mut dyn FnMut(usize, &str, String)| {
            if let Err(m) = res {
                p(line_of(f), f, m);
            }
        };
        let birth_date = match text("birth_date").map(|t| parse_birth_date(&t)) {
            Some(Ok(d)) => Some(d),
            Some(Err(m)) => {
                ok("birth_date", Err(m), &mut p);
                None
            }
            None => None,
        };
        let language = match text("language").map(|t| t.parse::<Language>()) {
            Some(Ok(l)) => Some(l),
            Some(Err(m)) => {
                ok("language", Err(m), &mut p);
                None
            }
            None => None,
        };
        let wander_risk = match text("wander_risk").map(|t| parse_yes_no(&t)) {
            Some(Ok(b)) => Some(b),
            Some(Err(m)) => {
                ok("wander_risk", Err(m), &mut p);
                None
            }
            None => None,
        };
        let radius = match text("radius_m").map(|t| parse_radius_m(&t)) {
            Some(Ok(v)) => Some(v),
            Some(Err(m)) => {
                ok("radius_m", Err(m), &mut p);
                None
            }
            None => None,
        };
        let home = match (text("home_lat"), text("home_lon")) {
            (None, None) => None,
            (Some(lat), Some(lon)) => {
                let lat_v = parse_degrees(&lat, "latitude");
                let lon_v = parse_degrees(&lon, "longitude");
                match (lat_v, lon_v) {
                    (Ok(la), Ok(lo)) => match HomeLocation::from_degrees(la, lo) {
                        Ok(h) => Some(h),
                        Err(m) => {
                            ok("home_lat", Err(m), &mut p);
                            None
                        }
                    },
                    (a, b) => {
                        if let Err(m) = a {
                            ok("home_lat", Err(m), &mut p);
                        }
                        if let Err(m) = b {
                            ok("home_lon", Err(m), &mut p);
                        }
                        None
                    }
                }
            }
            (Some(_), None) => {
                p(
                    line_of("home_lat"),
                    "home_lon",
                    "is missing: give both home_lat and home_lon".into(),
                );
                None
            }
            (None, Some(_)) => {
                p(
                    line_of("home_lon"),
                    "home_lat",
                    "is missing: give both home_lat and home_lon".into(),
                );
                None
            }
        };
        let thresholds = match &r.thresholds {
            None => None,
            Some((raw, tline)) => {
                let value = match raw {
                    RawJson::Json(v) => Ok(v.clone()),
                    RawJson::Text(t) => serde_json::from_str::<serde_json::Value>(t)
                        .map_err(|e| vec![format!("not valid JSON: {e}")]),
                };
                match value.and_then(|v| Thresholds::from_json(&v)) {
                    Ok(t) => Some(t),
                    Err(ms) => {
                        for m in ms {
                            p(*tline, "thresholds", m);
                        }
                        None
                    }
                }
            }
        };
        let gender = match text("gender").map(|t| t.parse::<Gender>()) {
            Some(Ok(g)) => Some(g),
            Some(Err(m)) => {
                ok("gender", Err(m), &mut p);
                None
            }
            None => None,
        };
        let categories = match text("categories").map(|t| parse_categories(&t)) {
            Some(Ok(c)) => Some(c),
            Some(Err(m)) => {
                ok("categories", Err(m), &mut p);
                None
            }
            None => None,
        };
        let mut list = |f: &str| match text(f).map(|t| parse_text_list(&t)) {
            Some(Ok(v)) => Some(v),
            Some(Err(m)) => {
                ok(f, Err(m), &mut p);
                None
            }
            None => None,
        };
        let conditions = list("conditions");
        let medications = list("medications");
        let elder = NewElder {
            external_ref: external_ref.clone(),
            name: text("name").unwrap_or_default(),
            id_number: text("id_number"),
            birth_date,
            phone: text("phone"),
            address: text("address"),
            community: text("community"),
            home,
            home_radius_m: radius,
            wander_risk,
            language,
            thresholds,
            notes: text("notes"),
            region: text("region"),
            gender,
            categories,
            conditions,
            medications,
        };
        let elder = match elder.validated() {
            Ok(e) => e,
            Err(fps) => {
                for fp in fps {
                    // Problems that come from parse steps already reported above are not
                    // repeated: validated() only re-checks text fields and ranges.
                    p(line_of(&fp.field), &fp.field, fp.message);
                }
                elder
            }
        };

        let who = external_ref
            .clone()
            .unwrap_or_else(|| format!("line {}", r.line));
        let mut devices = Vec::new();
        for d in &r.devices {
            let id = clean_text(&to_half_width(&d.text));
            if !is_valid_device_id(&id) {
                p(
                    d.line,
                    "devices",
                    format!(
                        "{:?} is not a device id: use 1 to 64 of A-Z a-z 0-9 _ -",
                        id
                    ),
                );
                continue;
            }
            match device_owner.get(&id) {
                Some((owner, first)) if *owner != who => p(
                    d.line,
                    "devices",
                    format!("{} is also given to {owner} on line {first}", id),
                ),
                Some(_) => {}
                None => {
                    device_owner.insert(id.clone(), (who.clone(), d.line));
                    devices.push(id.clone());
                }
            }
        }

        let mut links: Vec<PlannedLink> = Vec::new();
        for c in &r.contacts {
            let field = |f: &str| format!("{}{f}", c.prefix);
            let cline = |f: &str| c.cells.get(f).map(|x| x.line).unwrap_or(c.line);
            let role = match (&c.role, c.fixed_role) {
                (_, Some(role)) => Some(role),
                (Some(cell), None) => match cell.text.parse::<Role>() {
                    Ok(role) => Some(role),
                    Err(m) => {
                        p(cell.line, &field("role"), m);
                        None
                    }
                },
                (None, None) => {
                    p(c.line, &field("role"), "is required".into());
                    None
                }
            };
            let priority = match &c.priority {
                None => Some(c.default_priority),
                Some(cell) => match parse_priority(&cell.text) {
                    Ok(v) => Some(v),
                    Err(m) => {
                        p(cell.line, &field("priority"), m);
                        None
                    }
                },
            };
            let language = match c
                .cells
                .get("language")
                .map(|x| normalized("language", &x.text).parse::<Language>())
            {
                Some(Ok(l)) => Some(l),
                Some(Err(m)) => {
                    p(cline("language"), &field("language"), m);
                    None
                }
                None => None,
            };
            let ctext = |f: &str| c.cells.get(f).map(|x| normalized(f, &x.text));
            let contact = NewContact {
                external_ref: ctext("ref"),
                name: ctext("name").unwrap_or_default(),
                phone: ctext("phone"),
                email: ctext("email"),
                language,
                im_webhook: ctext("im_webhook"),
            };
            let contact = match contact.validated() {
                Ok(v) => v,
                Err(fps) => {
                    for fp in fps {
                        p(cline(&fp.field), &field(&fp.field), fp.message);
                    }
                    continue;
                }
            };
            // Without a phone or ref a contact could not be found again on the next run.
            let key = match (&contact.phone, &contact.external_ref) {
                (Some(ph), _) => format!("phone:{ph}"),
                (None, Some(r)) => format!("ref:{r}"),
                (None, None) => {
                    p(
                        c.line,
                        &field("phone"),
                        "is required: contacts are matched by phone (or by ref)".into(),
                    );
                    continue;
                }
            };
            if let Some(r) = &contact.external_ref {
                match ref_to_key.get(r) {
                    Some(k) if *k != key => {
                        p(
                            cline("ref"),
                            &field("ref"),
                            format!("{r:?} is used for two different phones"),
                        );
                        continue;
                    }
                    Some(_) => {}
                    None => {
                        ref_to_key.insert(r.clone(), key.clone());
                    }
                }
            }
            let idx = match contact_index.get(&key) {
                Some(&i) => {
                    let first = &mut plan.contacts[i];
                    if let Err(m) = merge_contact(&mut first.contact, &contact) {
                        p(
                            c.line,
                            &field("name"),
                            format!("{m} (first given on line {})", first.line),
                        );
                        continue;
                    }
                    i
                }
                None => {
                    plan.contacts.push(PlannedContact {
                        line: c.line,
                        contact,
                    });
                    contact_index.insert(key, plan.contacts.len() - 1);
                    plan.contacts.len() - 1
                }
            };
            let (Some(role), Some(priority)) = (role, priority) else {
                continue;
            };
            if links.iter().any(|l| l.contact == idx && l.role == role) {
                p(
                    c.line,
                    &field("name"),
                    format!("the same contact is listed twice as {role}"),
                );
                continue;
            }
            links.push(PlannedLink {
                contact: idx,
                role,
                priority,
            });
        }
        plan.elders.push(PlannedElder {
            line: r.line,
            elder,
            links,
            devices,
        });
    }
    if problems.is_empty() {
        Ok(plan)
    } else {
        problems.sort_by_key(|p| p.line);
        problems.dedup();
        Err(problems)
    }
}

/// Folds a repeated mention of a contact into the first: missing details are filled in,
/// contradicting ones are an error (which of two names is the grid worker's?).
fn merge_contact(first: &mut NewContact, again: &NewContact) -> Result<(), String> {
    if first.name != again.name {
        return Err(format!(
            "{} is given as {:?} and as {:?}",
            first
                .phone
                .as_deref()
                .or(first.external_ref.as_deref())
                .unwrap_or("this contact"),
            first.name,
            again.name
        ));
    }
    fn fill<T: Clone + PartialEq + fmt::Debug>(
        what: &str,
        a: &mut Option<T>,
        b: &Option<T>,
    ) -> Result<(), String> {
        match (a.as_ref(), b) {
            (Some(x), Some(y)) if x != y => Err(format!("{what} is given as {x:?} and as {y:?}")),
            (None, Some(y)) => {
                *a = Some(y.clone());
                Ok(())
            }
            _ => Ok(()),
        }
    }
    fill("email", &mut first.email, &again.email)?;
    fill("language", &mut first.language, &again.language)?;
    fill("im_webhook", &mut first.im_webhook, &again.im_webhook)?;
    fill("ref", &mut first.external_ref, &again.external_ref)?;
    fill("phone", &mut first.phone, &again.phone)?;
    Ok(())
}

/// Writes a validated plan in one transaction: all of it, or (on any error) none of it.
/// A dry run does every read and write the same way and then rolls back, so its counts are
/// exactly what the real run would do (only identity sequences advance).
pub async fn apply_import(
    pool: &Pool,
    plan: &ImportPlan,
    source: &str,
    dry_run: bool,
) -> Result<ImportSummary, RegistryError> {
    apply_import_as(pool, plan, source, dry_run, "import").await
}

/// [`apply_import`], recording `actor` (who imports: a user name, `cli`) on the device
/// bindings it makes.
pub async fn apply_import_as(
    pool: &Pool,
    plan: &ImportPlan,
    source: &str,
    dry_run: bool,
    actor: &str,
) -> Result<ImportSummary, RegistryError> {
    let mut summary = ImportSummary {
        dry_run,
        ..Default::default()
    };
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&REGISTRY_LOCK])
        .await?;
    let mut conflicts = Vec::new();
    let mut contact_ids = Vec::with_capacity(plan.contacts.len());
    for pc in &plan.contacts {
        match upsert_contact_in(&*tx, &pc.contact).await {
            Ok(up) => {
                if up.created {
                    summary.contacts_created += 1;
                } else if up.changed {
                    summary.contacts_updated += 1;
                } else {
                    summary.contacts_unchanged += 1;
                }
                contact_ids.push(up.id);
            }
            Err(RegistryError::Conflict(m)) => {
                conflicts.push(problem(pc.line, "contact", m));
                contact_ids.push(0);
            }
            Err(e) => return Err(db_at(e, source, pc.line)),
        }
    }
    let link_insert = tx
        .prepare(
            "INSERT INTO elder_contacts (elder_id, contact_id, role, priority)
             VALUES ($1, $2, $3, $4)
             ON CONFLICT (elder_id, contact_id, role) DO UPDATE SET priority = EXCLUDED.priority
             WHERE elder_contacts.priority <> EXCLUDED.priority",
        )
        .await?;
    for pe in &plan.elders {
        let up = match upsert_elder_in(&*tx, &pe.elder).await {
            Ok(up) => up,
            // A region code that is not a grid (or not there): only the database can tell.
            Err(RegistryError::Invalid { field, message }) => {
                conflicts.push(problem(pe.line, field, message));
                continue;
            }
            Err(e) => return Err(db_at(e, source, pe.line)),
        };
        if up.created {
            summary.elders_created += 1;
        } else if up.changed {
            summary.elders_updated += 1;
        } else {
            summary.elders_unchanged += 1;
        }
        if !conflicts.is_empty() {
            continue; // the import will fail; keep collecting, skip the rest
        }
        // The file is the ledger: links it no longer lists (a grid worker who moved on)
        // are removed, so alerts stop going to them.
        let ids: Vec<i64> = pe.links.iter().map(|l| contact_ids[l.contact]).collect();
        let roles: Vec<&str> = pe.links.iter().map(|l| l.role.as_str()).collect();
        summary.links_removed += tx
            .execute(
                "DELETE FROM elder_contacts ec WHERE ec.elder_id = $1
                   AND NOT EXISTS (SELECT 1 FROM unnest($2::bigint[], $3::text[]) AS k(cid, role)
                                   WHERE k.cid = ec.contact_id AND k.role = ec.role)",
                &[&up.id, &ids, &roles],
            )
            .await
            .map_err(|e| db_at(e.into(), source, pe.line))?;
        for l in &pe.links {
            let n = tx
                .execute(
                    &link_insert,
                    &[
                        &up.id,
                        &contact_ids[l.contact],
                        &l.role.as_str(),
                        &l.priority,
                    ],
                )
                .await
                .map_err(|e| db_at(e.into(), source, pe.line))?;
            if n > 0 {
                summary.links_set += 1;
            } else {
                summary.links_unchanged += 1;
            }
        }
        for d in &pe.devices {
            let (provisioned, bound) = super::devices::ensure_bound(&*tx, d, up.id, actor)
                .await
                .map_err(|e| db_at(e.into(), source, pe.line))?;
            if provisioned {
                summary.devices_provisioned += 1;
            } else if bound {
                summary.devices_bound += 1;
            } else {
                summary.devices_unchanged += 1;
            }
        }
        if pe.links.iter().all(|l| l.role != Role::GridWorker) {
            summary.warnings.push(format!(
                "line {}: {} ({}) has no grid worker: an SOS reaches no one local",
                pe.line,
                pe.elder.name,
                pe.elder.external_ref.as_deref().unwrap_or("-")
            ));
        }
    }
    if !conflicts.is_empty() {
        return Err(RegistryError::Import {
            path: source.to_string(),
            problems: conflicts,
        });
    }
    if dry_run {
        tx.rollback().await?;
    } else {
        tx.commit().await?;
    }
    Ok(summary)
}

fn db_at(e: RegistryError, source: &str, line: usize) -> RegistryError {
    match e {
        RegistryError::Store(err) => RegistryError::ImportDb {
            path: source.to_string(),
            line,
            source: err,
        },
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phones() {
        assert_eq!(parse_phone("138 0000 0001").unwrap(), "13800000001");
        assert_eq!(parse_phone("+86 138-0000-0001").unwrap(), "13800000001");
        assert_eq!(parse_phone("008613800000001").unwrap(), "13800000001");
        assert_eq!(parse_phone("0571-87654321").unwrap(), "057187654321");
        assert_eq!(parse_phone("+44 20 7946 0958").unwrap(), "+442079460958");
        assert!(parse_phone("1380000001").is_err()); // 10 digits
        assert!(parse_phone("12800000001").is_err()); // no 12x mobiles
        assert!(parse_phone("87654321").is_err()); // landline without area code
        assert!(parse_phone("138abc").is_err());
        assert!(parse_phone("").is_err());
    }

    #[test]
    fn id_numbers() {
        // GB 11643 check digit: the standard's own example.
        assert!(parse_id_number("11010519491231002X").is_ok());
        assert!(parse_id_number("11010519491231002x").is_ok());
        assert!(parse_id_number("110105194912310021").is_err());
        assert!(parse_id_number("12345").is_err());
    }

    #[test]
    fn homes_and_dates() {
        let h: HomeLocation = "30.2592,120.1631".parse().unwrap();
        assert_eq!(h.lat_e7, 302_592_000);
        assert_eq!(h.lon_e7, 1_201_631_000);
        assert!("30.2592，120.1631".parse::<HomeLocation>().is_ok());
        assert!("91,120".parse::<HomeLocation>().is_err());
        assert!("0,0".parse::<HomeLocation>().is_err());
        assert!("30.25".parse::<HomeLocation>().is_err());
        assert!(parse_birth_date("1941-03-12").is_ok());
        assert!(parse_birth_date("1941/3/12").is_ok());
        assert!(parse_birth_date("1941-13-12").is_err());
        assert!(parse_birth_date("2999-01-01").is_err());
        assert_eq!("zh_cn".parse::<Language>().unwrap(), Language::ZhCn);
        assert!("fr".parse::<Language>().is_err());
    }

    #[test]
    fn office_dates_widths_and_lists() {
        let d = |s: &str| parse_office_date(s).map(|d| d.to_string());
        for s in [
            "1945-03-02",
            "1945/3/2",
            "1945.3.2",
            "1945年3月2日",
            "19450302",
            "１９４５／３／２",
            " 1945-03-02 00:00:00 ",
            "1945/3/2 0:00",
        ] {
            assert_eq!(d(s).as_deref(), Some("1945-03-02"), "{s}");
        }
        for s in [
            "1945-13-02",
            "45/3/2",
            "1945/3/2 10:30",
            "1945032",
            "March 2 1945",
            "",
        ] {
            assert_eq!(d(s), None, "{s}");
        }
        assert_eq!(to_half_width("１３８－０００　Ａ，"), "138-000 A,");
        assert_eq!(clean_text("\u{3000} 张三\u{200B} "), "张三");
        assert_eq!(
            split_list("高血压、糖尿病；; 冠心病 ;"),
            ["高血压", "糖尿病", "冠心病"]
        );
        assert_eq!(
            parse_categories("独居老人、特困供养人员,empty-nest；独居").unwrap(),
            [
                Category::LivingAlone,
                Category::EmptyNest,
                Category::SpecialHardship
            ]
        );
        assert!(parse_categories("孤寡").unwrap_err().contains("孤寡"));
        assert_eq!(parse_categories("").unwrap(), []);
        assert_eq!("女".parse::<Gender>().unwrap(), Gender::Female);
        assert_eq!("M".parse::<Gender>().unwrap(), Gender::Male);
        assert!(parse_text_list(&"长".repeat(201)).is_err());
    }

    #[test]
    fn office_encodings() {
        let text = "编号,姓名\nA1,张三\n";
        let (gbk, _, _) = encoding_rs::GBK.encode(text);
        let d = decode_office_text(&gbk).unwrap();
        assert_eq!((d.text.as_str(), d.encoding), (text, "GB18030"));
        let mut bom = b"\xEF\xBB\xBF".to_vec();
        bom.extend_from_slice(text.as_bytes());
        assert_eq!(decode_office_text(&bom).unwrap().text, text);
        let mut utf16 = vec![0xFF, 0xFE];
        for u in text.encode_utf16() {
            utf16.extend_from_slice(&u.to_le_bytes());
        }
        assert_eq!(decode_office_text(&utf16).unwrap().encoding, "UTF-16LE");
        assert!(decode_office_text(b"PK\x03\x04rest")
            .unwrap_err()
            .message
            .contains("xlsx"));
        let bad = decode_office_text(b"ok\nline two \xFF\xFF\xFF").unwrap_err();
        assert_eq!(bad.line, 2);
    }

    #[test]
    fn chinese_headers_and_a_title_row() {
        let text = "东坡路社区独居老人台账,,,\n\
                    编号,姓名*,出生日期(年/月/日),网格员,网格员电话,监护人2姓名,监护人2电话,所属网格,,\n\
                    A1,张三,1940年1月2日,王芳,13800000001,张小,13900000001,G-1,,\n";
        let plan = parse_import(text, ImportFormat::Csv).unwrap();
        let e = &plan.elders[0];
        assert_eq!(e.line, 3);
        assert_eq!(e.elder.region.as_deref(), Some("G-1"));
        assert_eq!(
            e.elder.birth_date.map(|d| d.to_string()).as_deref(),
            Some("1940-01-02")
        );
        assert_eq!(e.links.len(), 2);
        assert_eq!(e.links[1].priority, 2);
        // A contact column needs its name; problems name the column as written.
        let text = "编号,姓名,性别\nA1,张三,X\n";
        let p = parse_import(text, ImportFormat::Csv).unwrap_err();
        assert_eq!(
            p[0].to_string(),
            "line 2, 性别 (gender): unknown gender \"x\": use female or male (女/男)"
        );
        assert_eq!(
            detect_csv_kind("编码,名称,级别,上级编码\n"),
            CsvKind::Regions
        );
        assert_eq!(
            detect_csv_kind("IMEI,型号\n861234567890123,X\n"),
            CsvKind::Devices
        );
        assert_eq!(detect_csv_kind("编号,姓名,手环IMEI\n"), CsvKind::Elders);
    }

    #[test]
    fn thresholds_validate_and_name_the_key() {
        let t = parse_thresholds(
            r#"{"hr_high": {"above": 120, "for": "5m"}, "spo2_low": {"below": 90, "for": "120s"}, "geofence_exit": {"for": "30m"}}"#,
        )
        .unwrap();
        let hr = t.get(ThresholdKey::HrHigh).unwrap();
        assert_eq!(hr.limit, Some((Direction::Above, 120.0)));
        assert_eq!(hr.sustain, Duration::from_secs(300));
        assert_eq!(
            t.to_json(),
            serde_json::json!({"hr_high": {"above": 120, "for": "5m"},
                               "spo2_low": {"below": 90, "for": "2m"}, "geofence_exit": {"for": "30m"}})
        );
        let bad = |s: &str| parse_thresholds(s).unwrap_err();
        assert!(bad(r#"{"hr_hi": {"above": 1}}"#).contains("unknown threshold \"hr_hi\""));
        assert!(
            bad(r#"{"hr_high": {"below": 120, "for": "2m"}}"#).contains("hr_high: use \"above\"")
        );
        assert!(bad(r#"{"hr_high": {"above": 120}}"#).contains("hr_high: needs \"for\""));
        assert!(
            bad(r#"{"hr_high": {"above": "120"}}"#).contains("hr_high: \"above\" must be a number")
        );
        assert!(bad(r#"{"hr_high": {"above": 1300}}"#).contains("outside"));
        assert!(bad(r#"{"temp_high": {"above": 38, "for": "2 parsecs"}}"#)
            .contains("temp_high: \"for\""));
        assert!(
            bad(r#"{"geofence_exit": {"above": 3}}"#).contains("geofence_exit: takes only \"for\"")
        );
        assert!(bad(r#"{"not_worn": {}}"#).contains("not_worn: needs \"for\""));
        assert!(bad(r#"[1]"#).contains("JSON object"));
        assert!(bad("{").contains("not valid JSON"));
        // Several problems are all reported.
        let many = bad(r#"{"hr_low": {"above": 40}, "x": 1}"#);
        assert!(many.contains("hr_low") && many.contains("\"x\""), "{many}");
    }

    #[test]
    fn keys() {
        assert_eq!("42".parse::<ElderKey>().unwrap(), ElderKey::Id(42));
        assert_eq!(
            "ref:XH-1".parse::<ElderKey>().unwrap(),
            ElderKey::Ref("XH-1".into())
        );
        assert!("张三".parse::<ElderKey>().is_err());
        assert_eq!(
            "phone:+86 138 0000 0001".parse::<ContactKey>().unwrap(),
            ContactKey::Phone("13800000001".into())
        );
    }

    #[test]
    fn csv_problems_carry_lines_and_fields() {
        let text = "\u{feff}ref,name,birth_date,language,grid_worker_name,grid_worker_phone\n\
                    A1,张三,1940-01-01,zh-CN,王芳,13800000001\n\
                    A2,李四,1940-02-30,zh-CN,王芳,13800000001\n\
                    A3,,1940-01-01,fr,王芳,1380000\n";
        let problems = parse_import(text, ImportFormat::Csv).unwrap_err();
        let shown: Vec<String> = problems.iter().map(|p| p.to_string()).collect();
        assert!(
            shown.iter().any(|s| s.starts_with("line 3, birth_date")),
            "{shown:?}"
        );
        assert!(
            shown.iter().any(|s| s.starts_with("line 4, name")),
            "{shown:?}"
        );
        assert!(
            shown.iter().any(|s| s.starts_with("line 4, language")),
            "{shown:?}"
        );
        assert!(
            shown
                .iter()
                .any(|s| s.starts_with("line 4, grid_worker_phone")),
            "{shown:?}"
        );
    }

    #[test]
    fn csv_contacts_dedupe_by_phone() {
        let text = "ref,name,grid_worker_name,grid_worker_phone,guardian1_name,guardian1_phone,guardian2_name,guardian2_phone\n\
                    A1,张三,王芳,138 0000 0001,张小明,13900000001,,\n\
                    A2,李四,王芳,+8613800000001,李华,13900000002,李强,13900000003\n";
        let plan = parse_import(text, ImportFormat::Csv).unwrap();
        assert_eq!(plan.elders.len(), 2);
        assert_eq!(plan.contacts.len(), 4);
        assert_eq!(plan.elders[1].links[2].priority, 2);
        let conflict = "ref,name,grid_worker_name,grid_worker_phone\nA1,张三,王芳,13800000001\nA2,李四,王方,13800000001\n";
        let p = parse_import(conflict, ImportFormat::Csv).unwrap_err();
        assert_eq!(p[0].line, 3, "{p:?}");
    }

    #[test]
    fn toml_lines() {
        let text = r#"
[[elders]]
ref = "A1"
name = "张三"
birth_date = 1941-03-12
contacts = [
  { role = "guardian", name = "张小明", phone = "13900000001", priority = 2 },
  { role = "nephew", name = "x", phone = "13900000002" },
]
devices = ["861234567890123"]

[[elders]]
ref = "A2"
name = "李四"
language = "fr"
"#;
        let problems = parse_import(text, ImportFormat::Toml).unwrap_err();
        let shown: Vec<String> = problems.iter().map(|p| p.to_string()).collect();
        assert!(
            shown
                .iter()
                .any(|s| s.starts_with("line 8, contacts[1].role")),
            "{shown:?}"
        );
        assert!(
            shown.iter().any(|s| s.starts_with("line 15, language")),
            "{shown:?}"
        );
    }
}
