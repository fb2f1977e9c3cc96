//! The three-tier network the programme is run through: city (市) → township or street
//! (乡镇、街道) → community or village (社区、村) → grid (网格). Elders live in grids;
//! supervisors and grid workers are given regions and see everything under them.
//!
//! Regions are found by their `code` (the office's own code, e.g. the statistical division
//! code `330102001001`, or anything of `A-Z a-z 0-9 _ . -`). The table keeps, through a
//! trigger, each region's `path` of ids from the root (`/1/4/17/`), so "everything under
//! this region" is one prefix match. A region's level and parent never change once it is
//! added (the trigger refuses a move); its name may.

use std::collections::HashMap;
use std::fmt;
use std::path::Path;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use deadpool_postgres::Pool;
use serde::{Serialize, Serializer};
use tokio_postgres::GenericClient;

use super::registry::{
    self, clean_text, problem, to_half_width, ImportProblem, RegistryError, Upserted,
};

/// A tier of the network, top down.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Level {
    City,
    Township,
    Community,
    Grid,
}

impl Level {
    pub const ALL: [Level; 4] = [Level::City, Level::Township, Level::Community, Level::Grid];

    pub fn as_str(self) -> &'static str {
        match self {
            Level::City => "city",
            Level::Township => "township",
            Level::Community => "community",
            Level::Grid => "grid",
        }
    }

    pub fn label_zh(self) -> &'static str {
        match self {
            Level::City => "市",
            Level::Township => "乡镇/街道",
            Level::Community => "社区/村",
            Level::Grid => "网格",
        }
    }

    /// The level a region of this level sits under (`None` for a city).
    pub fn parent(self) -> Option<Level> {
        match self {
            Level::City => None,
            Level::Township => Some(Level::City),
            Level::Community => Some(Level::Township),
            Level::Grid => Some(Level::Community),
        }
    }
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

/// `city`, `township` (also `street`, `subdistrict`), `community` (also `village`), `grid`,
/// or the Chinese: 市, 乡镇/街道/乡/镇, 社区/村/居委会/村委会, 网格.
impl FromStr for Level {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let norm = to_half_width(s).trim().to_lowercase();
        Ok(match norm.as_str() {
            "city" | "市" | "地级市" | "城市" | "县级市" => Level::City,
            "township" | "town" | "street" | "subdistrict" | "乡镇" | "街道" | "乡" | "镇"
            | "乡镇/街道" | "乡镇街道" | "街道/乡镇" => Level::Township,
            "community" | "village" | "社区" | "村" | "社区/村" | "村/社区" | "居委会"
            | "村委会" => Level::Community,
            "grid" | "网格" => Level::Grid,
            _ => {
                return Err(format!(
                    "unknown level {:?}: use city (市), township (乡镇/街道), community (社区/村) or grid (网格)",
                    s.trim()
                ))
            }
        })
    }
}

impl Serialize for Level {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> serde::Deserialize<'de> for Level {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A region code: 1 to 64 of `A-Z a-z 0-9 _ . -` (the schema's rule).
pub fn check_code(code: &str) -> Result<(), String> {
    if !code.is_empty()
        && code.len() <= 64
        && code
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
    {
        Ok(())
    } else {
        Err(format!(
            "{code:?} is not a region code: 1 to 64 of A-Z a-z 0-9 _ . -"
        ))
    }
}

/// A code as typed (full-width digits and spaces around it are tolerated), checked.
pub fn parse_code(raw: &str) -> Result<String, String> {
    let code = clean_text(&to_half_width(raw));
    check_code(&code)?;
    Ok(code)
}

/// What `region add` and the importer write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewRegion {
    pub code: String,
    pub name: String,
    pub level: Level,
    /// Required for every level but a city (which must have none).
    pub parent_code: Option<String>,
}

impl NewRegion {
    /// Trims and checks every field; all problems are returned, each naming its field.
    pub fn validated(&self) -> Result<NewRegion, Vec<registry::FieldProblem>> {
        let mut problems = Vec::new();
        let mut bad = |field: &str, message: String| {
            problems.push(registry::FieldProblem {
                field: field.into(),
                message,
            })
        };
        let code = clean_text(&to_half_width(&self.code));
        if let Err(m) = check_code(&code) {
            bad("code", m);
        }
        let name = clean_text(&self.name);
        if name.is_empty() {
            bad("name", "is required".into());
        } else if name.chars().count() > 200 || name.chars().any(char::is_control) {
            bad("name", "1 to 200 printable characters".into());
        }
        let parent_code = self
            .parent_code
            .as_deref()
            .map(|p| clean_text(&to_half_width(p)))
            .filter(|p| !p.is_empty());
        match (&parent_code, self.level) {
            (Some(_), Level::City) => bad(
                "parent_code",
                "a city is the top of the network and has no parent".into(),
            ),
            (None, level) if level != Level::City => bad(
                "parent_code",
                format!(
                    "a {level} needs its parent {} (the code of the region it belongs to)",
                    level.parent().map(Level::as_str).unwrap_or("region")
                ),
            ),
            (Some(p), _) => {
                if let Err(m) = check_code(p) {
                    bad("parent_code", m);
                } else if *p == code {
                    bad("parent_code", "a region cannot be its own parent".into());
                }
            }
            _ => {}
        }
        if problems.is_empty() {
            Ok(NewRegion {
                code,
                name,
                level: self.level,
                parent_code,
            })
        } else {
            Err(problems)
        }
    }
}

/// A region as stored.
#[derive(Debug, Clone, Serialize)]
pub struct Region {
    pub id: i64,
    pub code: String,
    pub name: String,
    pub level: Level,
    pub parent_id: Option<i64>,
    pub parent_code: Option<String>,
    /// Ids from the root, e.g. `/1/4/17/`.
    pub path: String,
    /// Names from the city down to this region.
    pub path_names: Vec<String>,
    /// Elders whose grid is this region or lies under it.
    pub elders: i64,
    #[serde(serialize_with = "ser_time")]
    pub created_at: DateTime<Utc>,
}

fn ser_time<S: Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
}

const REGION_SQL: &str = "SELECT r.id, r.code, r.name, r.level, r.parent_id, p.code, r.path,
        ARRAY(SELECT a.name FROM regions a WHERE left(r.path, length(a.path)) = a.path
              ORDER BY length(a.path)),
        (SELECT count(*) FROM elders e JOIN regions g ON g.id = e.region_id
          WHERE left(g.path, length(r.path)) = r.path),
        r.created_at
     FROM regions r LEFT JOIN regions p ON p.id = r.parent_id";

fn region_from_row(r: &tokio_postgres::Row) -> Region {
    let level: String = r.get(3);
    Region {
        id: r.get(0),
        code: r.get(1),
        name: r.get(2),
        // The column's CHECK admits only the four levels.
        level: level.parse().unwrap_or(Level::Grid),
        parent_id: r.get(4),
        parent_code: r.get(5),
        path: r.get(6),
        path_names: r.get(7),
        elders: r.get(8),
        created_at: r.get(9),
    }
}

/// Adds a region, or (same code) renames it. Its level and parent cannot change: asking for
/// another is a `Conflict`. The parent must exist and be one level up.
pub async fn add_region(pool: &Pool, region: &NewRegion) -> Result<Upserted, RegistryError> {
    let v = region.validated().map_err(invalid_all)?;
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    let up = upsert_region_in(&*tx, &v).await?;
    tx.commit().await?;
    Ok(up)
}

fn invalid_all(problems: Vec<registry::FieldProblem>) -> RegistryError {
    RegistryError::Invalid {
        field: problems
            .iter()
            .map(|p| p.field.as_str())
            .collect::<Vec<_>>()
            .join(", "),
        message: problems
            .iter()
            .map(|p| p.message.as_str())
            .collect::<Vec<_>>()
            .join("; "),
    }
}

/// [`add_region`] inside the caller's transaction, for a validated region.
pub async fn upsert_region_in<C: GenericClient + Sync>(
    c: &C,
    v: &NewRegion,
) -> Result<Upserted, RegistryError> {
    let parent: Option<(i64, Level)> = match &v.parent_code {
        None => None,
        Some(code) => {
            let row = c
                .query_opt("SELECT id, level FROM regions WHERE code = $1", &[code])
                .await?
                .ok_or_else(|| {
                    RegistryError::invalid_field(
                        "parent_code",
                        format!("no region has code {code:?}: add the parent first"),
                    )
                })?;
            let level: String = row.get(1);
            Some((row.get(0), level.parse().unwrap_or(Level::Grid)))
        }
    };
    if let Some((_, plevel)) = parent {
        if Some(plevel) != v.level.parent() {
            return Err(RegistryError::invalid_field(
                "parent_code",
                format!(
                    "{} is a {plevel}: a {} sits under a {}",
                    v.parent_code.as_deref().unwrap_or_default(),
                    v.level,
                    v.level.parent().map(Level::as_str).unwrap_or("nothing")
                ),
            ));
        }
    }
    let existing = c
        .query_opt(
            "SELECT r.id, r.name, r.level, p.code FROM regions r
             LEFT JOIN regions p ON p.id = r.parent_id WHERE r.code = $1 FOR UPDATE OF r",
            &[&v.code],
        )
        .await?;
    match existing {
        Some(row) => {
            let id: i64 = row.get(0);
            let name: String = row.get(1);
            let level: String = row.get(2);
            let parent_code: Option<String> = row.get(3);
            if level != v.level.as_str() {
                return Err(RegistryError::Conflict(format!(
                    "region {} is a {level}, not a {}: a region's level cannot change",
                    v.code, v.level
                )));
            }
            if parent_code != v.parent_code {
                return Err(RegistryError::Conflict(format!(
                    "region {} belongs to {}, not {}: regions cannot be moved",
                    v.code,
                    parent_code.as_deref().unwrap_or("nothing"),
                    v.parent_code.as_deref().unwrap_or("nothing")
                )));
            }
            if name == v.name {
                return Ok(Upserted {
                    id,
                    created: false,
                    changed: false,
                });
            }
            c.execute(
                "UPDATE regions SET name = $2 WHERE id = $1",
                &[&id, &v.name],
            )
            .await?;
            Ok(Upserted {
                id,
                created: false,
                changed: true,
            })
        }
        None => {
            let id: i64 = c
                .query_one(
                    "INSERT INTO regions (parent_id, level, code, name) VALUES ($1, $2, $3, $4)
                     RETURNING id",
                    &[&parent.map(|p| p.0), &v.level.as_str(), &v.code, &v.name],
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

/// Regions in tree order (each after its parent), optionally only the subtree of `under`
/// (a code; the region itself included). An unknown `under` is `NotFound`.
pub async fn list_regions(pool: &Pool, under: Option<&str>) -> Result<Vec<Region>, RegistryError> {
    let client = pool.get().await?;
    let path: Option<String> = match under {
        None => None,
        Some(code) => Some(
            client
                .query_opt("SELECT path FROM regions WHERE code = $1", &[&code.trim()])
                .await?
                .map(|r| r.get(0))
                .ok_or_else(|| RegistryError::NotFound(format!("region {}", code.trim())))?,
        ),
    };
    let rows = client
        .query(
            &format!(
                "{REGION_SQL} WHERE $1::text IS NULL OR left(r.path, length($1)) = $1
                 ORDER BY (SELECT string_agg(lpad(a.code, 64), '/' ORDER BY length(a.path))
                           FROM regions a WHERE left(r.path, length(a.path)) = a.path)"
            ),
            &[&path],
        )
        .await?;
    Ok(rows.iter().map(region_from_row).collect())
}

pub async fn get_region_by_code(pool: &Pool, code: &str) -> Result<Region, RegistryError> {
    let client = pool.get().await?;
    client
        .query_opt(&format!("{REGION_SQL} WHERE r.code = $1"), &[&code.trim()])
        .await?
        .map(|r| region_from_row(&r))
        .ok_or_else(|| RegistryError::NotFound(format!("region {}", code.trim())))
}

pub async fn get_region(pool: &Pool, id: i64) -> Result<Region, RegistryError> {
    let client = pool.get().await?;
    client
        .query_opt(&format!("{REGION_SQL} WHERE r.id = $1"), &[&id])
        .await?
        .map(|r| region_from_row(&r))
        .ok_or_else(|| RegistryError::NotFound(format!("region {id}")))
}

/// Removes a region without sub-regions; its elders keep their record, without a region.
pub async fn remove_region(pool: &Pool, code: &str) -> Result<i64, RegistryError> {
    let client = pool.get().await?;
    let code = code.trim();
    let row = client
        .query_opt(
            "SELECT id, (SELECT count(*) FROM regions c WHERE c.parent_id = r.id)
             FROM regions r WHERE code = $1",
            &[&code],
        )
        .await?
        .ok_or_else(|| RegistryError::NotFound(format!("region {code}")))?;
    let (id, children): (i64, i64) = (row.get(0), row.get(1));
    if children > 0 {
        return Err(RegistryError::Conflict(format!(
            "region {code} has {children} sub-region(s): remove them first"
        )));
    }
    client
        .execute("DELETE FROM regions WHERE id = $1", &[&id])
        .await?;
    Ok(id)
}

// ---------------------------------------------------------------------------------------
// Import
// ---------------------------------------------------------------------------------------

/// The region field of a (normalized) header cell, English or Chinese.
pub(crate) fn region_column(h: &str) -> Option<&'static str> {
    Some(match h {
        "code" | "region_code" | "编码" | "代码" | "区划代码" | "区域编码" | "区域代码"
        | "网格编码" => "code",
        "name" | "region_name" | "名称" | "区域名称" | "区划名称" | "网格名称" => {
            "name"
        }
        "level" | "tier" | "级别" | "层级" | "区域级别" => "level",
        "parent_code" | "parent" | "上级编码" | "上级代码" | "上级区划代码" | "父级编码"
        | "上级" => "parent_code",
        _ => return None,
    })
}

/// A validated row of a regions file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedRegion {
    pub line: usize,
    pub region: NewRegion,
}

/// What a region import did (or, for a dry run, would do).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RegionImportSummary {
    pub dry_run: bool,
    pub regions_created: u64,
    /// Renamed.
    pub regions_updated: u64,
    pub regions_unchanged: u64,
}

/// Parses a regions CSV (columns code, name, level, parent_code, or 编码, 名称, 级别,
/// 上级编码), already decoded. Rows may come in any order; a parent may be in the file or
/// already in the database. The plan comes back parents first.
pub fn parse_region_csv(text: &str) -> Result<Vec<PlannedRegion>, Vec<ImportProblem>> {
    let table = registry::read_csv_table(text, |h| region_column(h).is_some())?;
    let mut problems = Vec::new();
    let mut cols: Vec<Option<&'static str>> = Vec::new();
    let mut seen: HashMap<&'static str, usize> = HashMap::new();
    for (i, h) in table.headers.iter().enumerate() {
        if h.is_empty() {
            cols.push(None);
            continue;
        }
        match region_column(h) {
            Some(c) => {
                if let Some(first) = seen.insert(c, i + 1) {
                    problems.push(problem(
                        table.header_line,
                        c,
                        format!("column appears twice (columns {first} and {})", i + 1),
                    ));
                }
                cols.push(Some(c));
            }
            None => {
                problems.push(problem(
                    table.header_line,
                    table.raw_headers[i].clone(),
                    "unknown column: use code, name, level, parent_code",
                ));
                cols.push(None);
            }
        }
    }
    for required in ["code", "name", "level"] {
        if !seen.contains_key(required) {
            problems.push(problem(
                table.header_line,
                required,
                "required column is missing",
            ));
        }
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    let mut out: Vec<PlannedRegion> = Vec::new();
    let mut codes: HashMap<String, usize> = HashMap::new();
    for row in &table.rows {
        let line = row.line;
        let cell = |name: &str| -> String {
            cols.iter()
                .position(|c| *c == Some(name))
                .and_then(|i| row.cells.get(i))
                .cloned()
                .unwrap_or_default()
        };
        let level = match cell("level").parse::<Level>() {
            Ok(l) => l,
            Err(m) => {
                let m = if cell("level").is_empty() {
                    "is required".to_string()
                } else {
                    m
                };
                problems.push(problem(line, "level", m));
                continue;
            }
        };
        let new = NewRegion {
            code: cell("code"),
            name: cell("name"),
            level,
            parent_code: Some(cell("parent_code")),
        };
        match new.validated() {
            Ok(v) => {
                if let Some(first) = codes.insert(v.code.clone(), line) {
                    problems.push(problem(
                        line,
                        "code",
                        format!("{} is also on line {first}", v.code),
                    ));
                    continue;
                }
                out.push(PlannedRegion { line, region: v });
            }
            Err(fps) => {
                for fp in fps {
                    problems.push(problem(line, fp.field, fp.message));
                }
            }
        }
    }
    // A parent given in the file must be one level up.
    let by_code: HashMap<&str, &PlannedRegion> =
        out.iter().map(|p| (p.region.code.as_str(), p)).collect();
    for p in &out {
        if let Some(parent) = p.region.parent_code.as_deref().and_then(|c| by_code.get(c)) {
            if Some(parent.region.level) != p.region.level.parent() {
                problems.push(problem(
                    p.line,
                    "parent_code",
                    format!(
                        "{} is a {} (line {}): a {} sits under a {}",
                        parent.region.code,
                        parent.region.level,
                        parent.line,
                        p.region.level,
                        p.region
                            .level
                            .parent()
                            .map(Level::as_str)
                            .unwrap_or("nothing")
                    ),
                ));
            }
        }
    }
    if !problems.is_empty() {
        problems.sort_by_key(|p| p.line);
        return Err(problems);
    }
    // Parents before children: the levels are strictly ordered, so sorting by level works.
    out.sort_by_key(|p| (p.region.level, p.line));
    Ok(out)
}

/// Reads and validates a regions file (UTF-8, UTF-8 with BOM, or GBK/GB18030).
pub fn read_region_file(path: &Path) -> Result<Vec<PlannedRegion>, RegistryError> {
    let shown = path.display().to_string();
    let text = registry::read_office_file(path)?;
    parse_region_csv(&text).map_err(|problems| RegistryError::Import {
        path: shown,
        problems,
    })
}

/// Writes a region plan in one transaction, parents first; a parent missing from both the
/// file and the database, a level that does not fit, or a region that would move is
/// reported with its line, and nothing is kept. A dry run rolls back at the end.
pub async fn apply_region_import(
    pool: &Pool,
    plan: &[PlannedRegion],
    source: &str,
    dry_run: bool,
) -> Result<RegionImportSummary, RegistryError> {
    let mut summary = RegionImportSummary {
        dry_run,
        ..Default::default()
    };
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    let mut problems = Vec::new();
    for p in plan {
        match upsert_region_in(&*tx, &p.region).await {
            Ok(up) if up.created => summary.regions_created += 1,
            Ok(up) if up.changed => summary.regions_updated += 1,
            Ok(_) => summary.regions_unchanged += 1,
            Err(RegistryError::Invalid { field, message }) => {
                problems.push(problem(p.line, field, message))
            }
            Err(RegistryError::Conflict(m)) => problems.push(problem(p.line, "code", m)),
            Err(RegistryError::Store(e)) => {
                return Err(RegistryError::ImportDb {
                    path: source.to_string(),
                    line: p.line,
                    source: e,
                })
            }
            Err(e) => return Err(e),
        }
    }
    if !problems.is_empty() {
        problems.sort_by_key(|p| p.line);
        return Err(RegistryError::Import {
            path: source.to_string(),
            problems,
        });
    }
    if dry_run {
        tx.rollback().await?;
    } else {
        tx.commit().await?;
    }
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels() {
        assert_eq!("街道".parse::<Level>().unwrap(), Level::Township);
        assert_eq!("村".parse::<Level>().unwrap(), Level::Community);
        assert_eq!(" GRID ".parse::<Level>().unwrap(), Level::Grid);
        assert!("province".parse::<Level>().is_err());
        assert_eq!(Level::Grid.parent(), Some(Level::Community));
    }

    #[test]
    fn region_csv_orders_parents_first_and_checks_levels() {
        let text = "\u{feff}编码,名称,级别,上级编码\n\
                    HZ-SC-HB-DPL-01,东坡路第一网格,网格,HZ-SC-HB-DPL\n\
                    HZ,杭州市,市,\n\
                    HZ-SC-HB,湖滨街道,街道,HZ\n\
                    HZ-SC-HB-DPL,东坡路社区,社区,HZ-SC-HB\n";
        let plan = parse_region_csv(text).unwrap();
        let codes: Vec<&str> = plan.iter().map(|p| p.region.code.as_str()).collect();
        assert_eq!(codes, ["HZ", "HZ-SC-HB", "HZ-SC-HB-DPL", "HZ-SC-HB-DPL-01"]);
        assert_eq!(plan[3].line, 2);

        let bad = "code,name,level,parent_code\n\
                   HZ,杭州市,city,\n\
                   G1,网格一,grid,HZ\n\
                   T1,,township,HZ\n\
                   X 1,某地,province,HZ\n\
                   C1,社区,community,\n";
        let problems = parse_region_csv(bad).unwrap_err();
        let shown: Vec<String> = problems.iter().map(|p| p.to_string()).collect();
        assert!(
            shown.iter().any(|s| s.starts_with("line 3, parent_code")),
            "{shown:?}"
        );
        assert!(
            shown.iter().any(|s| s.starts_with("line 4, name")),
            "{shown:?}"
        );
        assert!(
            shown.iter().any(|s| s.starts_with("line 5, level")),
            "{shown:?}"
        );
        assert!(
            shown.iter().any(|s| s.starts_with("line 6, parent_code")),
            "{shown:?}"
        );
    }
}
