//! Alert messages as people read them: the email subject and bodies, the SMS and the IM
//! group-robot markdown, in Simplified Chinese and English.
//!
//! Pure functions, no IO: the notifier renders an [`AlertView`] for each recipient's language
//! and hands the parts to the channels. Every message says who (the elder's name), what
//! happened, when (China Standard Time), where (a map link), the latest vitals and how to
//! acknowledge (the one-click link), because the person who reads it may be standing in a
//! stairwell with only this message to act on.
//!
//! Field values come from office spreadsheets and from devices, so nothing is trusted: the
//! HTML escapes every field, the SMS and the markdown drop markup characters and control
//! characters, and links are only made clickable when they are `http(s)`.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use chrono::{DateTime, FixedOffset, Utc};

/// The language of a recipient, as stored on the contact.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Lang {
    #[default]
    ZhCn,
    En,
}

/// A language tag we do not have templates for.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unsupported language {0:?} (use \"zh-CN\" or \"en\")")]
pub struct UnknownLang(pub String);

impl Lang {
    /// Parses a BCP 47-ish tag: `zh-CN`, `zh`, `zh_CN`, `zh-Hans`, `en`, `en-US`, ...
    /// (case-insensitive), because contact sheets are typed by hand.
    pub fn parse(tag: &str) -> Option<Lang> {
        let t = tag.trim().to_ascii_lowercase().replace('_', "-");
        let primary = t.split('-').next().unwrap_or_default();
        match primary {
            "zh" => Some(Lang::ZhCn),
            "en" => Some(Lang::En),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Lang::ZhCn => "zh-CN",
            Lang::En => "en",
        }
    }
}

impl std::str::FromStr for Lang {
    type Err = UnknownLang;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Lang::parse(s).ok_or_else(|| UnknownLang(s.to_string()))
    }
}

impl std::fmt::Display for Lang {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The latest readings of the elder's bracelet (`None` = not measured).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct VitalsView {
    pub heart_rate_bpm: Option<i16>,
    pub spo2_pct: Option<i16>,
    pub systolic_mmhg: Option<i16>,
    pub diastolic_mmhg: Option<i16>,
    /// Skin temperature in tenths of a degree Celsius (365 = 36.5 ℃).
    pub skin_temp_dc: Option<i16>,
    pub battery_pct: Option<i16>,
    /// When these readings were measured.
    pub at: Option<DateTime<Utc>>,
}

/// Everything a message about one alert may say.
#[derive(Debug, Clone, PartialEq)]
pub struct AlertView {
    pub alert_id: i64,
    /// `sos`, `fall`, `fall_cancelled`, `hr_high`, `hr_low`, `spo2_low`, `temp_high`,
    /// `bp_high`, `device_silent`, `not_worn`, `low_battery`, `geofence_exit`,
    /// `wellness_check`, `reminder`; anything else renders as a generic alert.
    pub kind: String,
    /// `critical`, `high`, `medium` or `low`.
    pub severity: String,
    pub elder_name: String,
    pub elder_address: Option<String>,
    pub elder_phone: Option<String>,
    pub device_id: String,
    pub occurred_at: DateTime<Utc>,
    /// WGS-84 latitude and longitude, as the bracelet reported them.
    pub location: Option<(f64, f64)>,
    pub vitals: Option<VitalsView>,
    /// The signed one-click acknowledge link.
    pub ack_url: Option<String>,
    pub console_url: Option<String>,
    /// 0 for the first round; n > 0 once the alert has escalated n steps.
    pub escalation_step: i32,
    /// How many times this notification has been repeated to the same people without an
    /// acknowledgement: n > 0 renders as "reminder #n" / "第n次提醒".
    pub repeat_count: i32,
    /// What the rule saw, e.g. "HR 142 bpm for 2 min".
    pub detail: Option<String>,
}

/// One alert rendered for one language.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    pub subject: String,
    pub text: String,
    pub html: String,
    /// Short, plain text, link last (≤ 140 characters in Chinese with a ~60-character link).
    pub sms: String,
    /// For WeCom / DingTalk group robots.
    pub im_markdown: String,
}

/// SMS length targets in characters. A Chinese SMS segment holds 70 UCS-2 characters and
/// operators join long messages, but every extra segment costs money and delay, and the
/// brief for grid workers is "short enough to read at a glance"; a GSM-7 English segment
/// holds 160 characters.
const SMS_MAX_CHARS_ZH: usize = 140;
const SMS_MAX_CHARS_EN: usize = 160;

/// China Standard Time. China has had no daylight saving since 1991, so a fixed offset is
/// exact and spares us a time-zone database.
fn cst() -> FixedOffset {
    FixedOffset::east_opt(8 * 3600).expect("UTC+8 is within ±24 h")
}

fn fmt_time(t: DateTime<Utc>) -> String {
    t.with_timezone(&cst())
        .format("%Y-%m-%d %H:%M:%S")
        .to_string()
}

fn fmt_time_short(t: DateTime<Utc>) -> String {
    t.with_timezone(&cst()).format("%m-%d %H:%M").to_string()
}

/// The human name of an alert kind.
pub fn kind_label(kind: &str, lang: Lang) -> &'static str {
    let (zh, en) = match kind {
        "sos" => ("紧急呼救 SOS", "SOS emergency call"),
        "fall" => ("跌倒报警", "Fall detected"),
        "fall_cancelled" => (
            "跌倒报警（佩戴者已取消）",
            "Fall alarm cancelled by the wearer",
        ),
        "hr_high" => ("心率过高", "Heart rate too high"),
        "hr_low" => ("心率过低", "Heart rate too low"),
        "spo2_low" => ("血氧过低", "Blood oxygen (SpO2) too low"),
        "temp_high" => ("体温过高", "Body temperature too high"),
        "bp_high" => ("血压过高", "Blood pressure too high"),
        "device_silent" => ("手环失联", "Bracelet has gone silent"),
        "not_worn" => ("手环长时间未佩戴", "Bracelet not worn for a long time"),
        "low_battery" => ("手环电量低", "Bracelet battery low"),
        "geofence_exit" => ("离开居家安全区域", "Left the home safety area"),
        "wellness_check" => (
            "每日敲门：今日未见活动",
            "Daily check: no sign of life today",
        ),
        "reminder" => ("提醒：警报尚未处理完毕", "Reminder: alert not yet resolved"),
        _ => ("健康警报", "Health alert"),
    };
    match lang {
        Lang::ZhCn => zh,
        Lang::En => en,
    }
}

fn severity_label(sev: &str, lang: Lang) -> &'static str {
    match (sev, lang) {
        ("critical", Lang::ZhCn) => "紧急",
        ("high", Lang::ZhCn) => "高",
        ("medium", Lang::ZhCn) => "中",
        ("low", Lang::ZhCn) => "低",
        (_, Lang::ZhCn) => "提示",
        ("critical", Lang::En) => "CRITICAL",
        ("high", Lang::En) => "HIGH",
        ("medium", Lang::En) => "MEDIUM",
        ("low", Lang::En) => "LOW",
        (_, Lang::En) => "NOTICE",
    }
}

/// Map link for a position. Chinese readers get Amap (高德), which opens in the apps people
/// have; others get OpenStreetMap. The bracelet reports WGS-84 while Amap expects GCJ-02, so
/// the Amap marker can sit a few hundred metres off; we accept that rather than embed the
/// (unofficial) GCJ-02 transform, because the written address is in the message too.
fn map_link(lat: f64, lon: f64, lang: Lang) -> Option<String> {
    if !lat.is_finite() || !lon.is_finite() || lat.abs() > 90.0 || lon.abs() > 180.0 {
        return None;
    }
    Some(match lang {
        Lang::ZhCn => format!("https://uri.amap.com/marker?position={lon:.6},{lat:.6}"),
        Lang::En => format!(
            "https://www.openstreetmap.org/?mlat={lat:.6}&mlon={lon:.6}#map=17/{lat:.6}/{lon:.6}"
        ),
    })
}

/// Removes control characters (newlines would let a name forge extra lines or headers) and
/// trims; used for every field before it goes anywhere.
fn clean(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect::<String>()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

/// For SMS: no markup at all, so angle brackets become their full-width look-alikes.
fn plain(s: &str) -> String {
    clean(s)
        .chars()
        .map(|c| match c {
            '<' => '‹',
            '>' => '›',
            c => c,
        })
        .collect()
}

/// For IM markdown: WeCom interprets `<font>` tags and both robots interpret `[..](..)`,
/// `*`, `_` and backticks, so a field could restyle or add links; swap those characters for
/// look-alikes that markdown leaves alone.
fn md(s: &str) -> String {
    clean(s)
        .chars()
        .map(|c| match c {
            '<' => '‹',
            '>' => '›',
            '[' => '［',
            ']' => '］',
            '(' => '（',
            ')' => '）',
            '*' => '＊',
            '_' => '＿',
            '`' => 'ˋ',
            '#' => '＃',
            c => c,
        })
        .collect()
}

/// Escapes text for HTML element content and quoted attribute values.
pub fn html_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Only http(s) links become clickable; anything else (`javascript:`, garbage) is dropped.
fn safe_url(u: &Option<String>) -> Option<String> {
    let u = u.as_deref()?.trim();
    let ok = (u.starts_with("https://") || u.starts_with("http://"))
        && !u
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || c == '"' || c == '<' || c == '>');
    ok.then(|| u.to_string())
}

/// Truncates to at most `max` characters, marking the cut with an ellipsis.
fn truncate(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        return s.to_string();
    }
    if max == 0 {
        return String::new();
    }
    let mut out: String = s.chars().take(max - 1).collect();
    out.push('…');
    out
}

fn vitals_line(v: &VitalsView, lang: Lang) -> Option<String> {
    let mut parts = Vec::new();
    let zh = lang == Lang::ZhCn;
    if let Some(hr) = v.heart_rate_bpm {
        parts.push(if zh {
            format!("心率 {hr} 次/分")
        } else {
            format!("HR {hr} bpm")
        });
    }
    if let Some(s) = v.spo2_pct {
        parts.push(if zh {
            format!("血氧 {s}%")
        } else {
            format!("SpO2 {s}%")
        });
    }
    match (v.systolic_mmhg, v.diastolic_mmhg) {
        (Some(s), Some(d)) => parts.push(if zh {
            format!("血压 {s}/{d} mmHg")
        } else {
            format!("BP {s}/{d} mmHg")
        }),
        (Some(s), None) => parts.push(if zh {
            format!("收缩压 {s} mmHg")
        } else {
            format!("systolic {s} mmHg")
        }),
        _ => {}
    }
    if let Some(t) = v.skin_temp_dc {
        let sign = if t < 0 { "-" } else { "" };
        let a = i32::from(t).abs();
        let t = format!("{sign}{}.{}", a / 10, a % 10);
        parts.push(if zh {
            format!("体温 {t}℃")
        } else {
            format!("temp {t} °C")
        });
    }
    if let Some(b) = v.battery_pct {
        parts.push(if zh {
            format!("电量 {b}%")
        } else {
            format!("battery {b}%")
        });
    }
    if parts.is_empty() {
        return None;
    }
    let sep = if zh { "，" } else { ", " };
    let mut line = parts.join(sep);
    if let Some(at) = v.at {
        if zh {
            let _ = write!(line, "（测于 {}）", fmt_time(at));
        } else {
            let _ = write!(line, " (measured {})", fmt_time(at));
        }
    }
    Some(line)
}

/// "escalated, step n" and "reminder #n", when they apply.
fn progress(view: &AlertView, lang: Lang) -> Vec<String> {
    let mut out = Vec::new();
    if view.escalation_step > 0 {
        out.push(match lang {
            Lang::ZhCn => format!("已升级至第{}级", view.escalation_step),
            Lang::En => format!("escalated to step {}", view.escalation_step),
        });
    }
    if view.repeat_count > 0 {
        out.push(match lang {
            Lang::ZhCn => format!("第{}次提醒", view.repeat_count),
            Lang::En => format!("reminder #{}", view.repeat_count),
        });
    }
    out
}

/// The facts every part shares, cleaned once.
struct Facts {
    label: &'static str,
    sev: &'static str,
    name: String,
    time: String,
    address: Option<String>,
    phone: Option<String>,
    device: String,
    map: Option<String>,
    vitals: Option<String>,
    detail: Option<String>,
    progress: Vec<String>,
    ack: Option<String>,
    console: Option<String>,
}

fn facts(view: &AlertView, lang: Lang) -> Facts {
    let non_empty = |s: &Option<String>| s.as_deref().map(clean).filter(|s| !s.is_empty());
    let name = clean(&view.elder_name);
    Facts {
        label: kind_label(&view.kind, lang),
        sev: severity_label(&view.severity, lang),
        name: if name.is_empty() {
            match lang {
                Lang::ZhCn => "（未登记姓名）".into(),
                Lang::En => "(unnamed)".into(),
            }
        } else {
            name
        },
        time: fmt_time(view.occurred_at),
        address: non_empty(&view.elder_address),
        phone: non_empty(&view.elder_phone),
        device: clean(&view.device_id),
        map: view
            .location
            .and_then(|(lat, lon)| map_link(lat, lon, lang)),
        vitals: view.vitals.as_ref().and_then(|v| vitals_line(v, lang)),
        detail: non_empty(&view.detail),
        progress: progress(view, lang),
        ack: safe_url(&view.ack_url),
        console: safe_url(&view.console_url),
    }
}

/// Renders every part of the message for one language.
pub fn render(view: &AlertView, lang: Lang) -> Rendered {
    let f = facts(view, lang);
    Rendered {
        subject: subject(&f, lang),
        text: text(&f, view, lang),
        html: html(&f, view, lang),
        sms: sms(&f, view, lang),
        im_markdown: markdown(&f, lang),
    }
}

fn subject(f: &Facts, lang: Lang) -> String {
    let mut s = match lang {
        Lang::ZhCn => format!("【{}】{}：{}", f.sev, f.name, f.label),
        Lang::En => format!("[{}] {}: {}", f.sev, f.name, f.label),
    };
    if !f.progress.is_empty() {
        let sep = if lang == Lang::ZhCn { "，" } else { ", " };
        match lang {
            Lang::ZhCn => {
                let _ = write!(s, "（{}）", f.progress.join(sep));
            }
            Lang::En => {
                let _ = write!(s, " ({})", f.progress.join(sep));
            }
        }
    }
    s
}

/// (label, value) rows shared by the text and HTML bodies; `None` values are shown as
/// "unknown" so the reader knows the field was not forgotten.
fn rows(f: &Facts, view: &AlertView, lang: Lang) -> Vec<(&'static str, Option<String>)> {
    let zh = lang == Lang::ZhCn;
    let what = match &f.detail {
        Some(d) => format!("{}（{}）", f.label, d),
        None => f.label.to_string(),
    };
    let what = if zh {
        what
    } else {
        what.replace('（', " (").replace('）', ")")
    };
    let time = if zh {
        format!("{}（北京时间）", f.time)
    } else {
        format!("{} (China Standard Time, UTC+8)", f.time)
    };
    let mut rows = vec![
        (if zh { "老人" } else { "Elder" }, Some(f.name.clone())),
        (if zh { "事件" } else { "What" }, Some(what)),
        (
            if zh { "级别" } else { "Severity" },
            Some(f.sev.to_string()),
        ),
        (if zh { "时间" } else { "When" }, Some(time)),
        (if zh { "地址" } else { "Address" }, f.address.clone()),
        (if zh { "位置" } else { "Location" }, f.map.clone()),
        (
            if zh { "老人电话" } else { "Elder's phone" },
            f.phone.clone(),
        ),
        (
            if zh { "最新体征" } else { "Latest vitals" },
            f.vitals.clone(),
        ),
        (if zh { "手环" } else { "Bracelet" }, Some(f.device.clone())),
        (
            if zh { "警报编号" } else { "Alert" },
            Some(format!("#{}", view.alert_id)),
        ),
    ];
    if !f.progress.is_empty() {
        let sep = if zh { "，" } else { ", " };
        rows.push((
            if zh { "进度" } else { "Progress" },
            Some(f.progress.join(sep)),
        ));
    }
    rows
}

fn unknown(lang: Lang) -> &'static str {
    match lang {
        Lang::ZhCn => "未知",
        Lang::En => "unknown",
    }
}

fn text(f: &Facts, view: &AlertView, lang: Lang) -> String {
    let zh = lang == Lang::ZhCn;
    let colon = if zh { "：" } else { ": " };
    let mut t = String::new();
    let _ = writeln!(t, "{}", subject(f, lang));
    t.push('\n');
    for (k, v) in rows(f, view, lang) {
        let _ = writeln!(t, "{k}{colon}{}", v.as_deref().unwrap_or(unknown(lang)));
    }
    t.push('\n');
    match &f.ack {
        Some(url) => {
            let _ = writeln!(
                t,
                "{}{colon}{url}",
                if zh {
                    "确认已收到并处理（一键确认）"
                } else {
                    "Acknowledge (one click)"
                }
            );
        }
        None => {
            let _ = writeln!(
                t,
                "{}",
                if zh {
                    "请登录控制台确认此警报。"
                } else {
                    "Please acknowledge this alert in the console."
                }
            );
        }
    }
    if let Some(url) = &f.console {
        let _ = writeln!(t, "{}{colon}{url}", if zh { "控制台" } else { "Console" });
    }
    t.push('\n');
    let _ = writeln!(
        t,
        "{}",
        if zh {
            "—— 银龄守护（Silverguard）自动通知。确认前将持续提醒并逐级上报。"
        } else {
            "-- Silverguard automatic notice. It repeats and escalates until someone acknowledges."
        }
    );
    t
}

fn html(f: &Facts, view: &AlertView, lang: Lang) -> String {
    let zh = lang == Lang::ZhCn;
    let colour = match view.severity.as_str() {
        "critical" => "#b00020",
        "high" => "#d35400",
        "medium" => "#b7950b",
        _ => "#2e86c1",
    };
    let mut h = String::new();
    let _ = write!(
        h,
        "<!DOCTYPE html>\n<html lang=\"{}\"><head><meta charset=\"utf-8\"><title>{}</title></head>\
         <body style=\"font-family:sans-serif;line-height:1.5;color:#222\">\n",
        lang.as_str(),
        html_escape(&subject(f, lang))
    );
    let _ = writeln!(
        h,
        "<h2 style=\"color:{colour};margin:0 0 12px\">{} · {}</h2>",
        html_escape(f.label),
        html_escape(&f.name)
    );
    h.push_str("<table cellpadding=\"4\" style=\"border-collapse:collapse\">\n");
    let location_key = if zh { "位置" } else { "Location" };
    for (k, v) in rows(f, view, lang) {
        let cell = match (k, &v) {
            (key, Some(url)) if key == location_key => format!(
                "<a href=\"{}\">{}</a>",
                html_escape(url),
                if zh { "在地图上查看" } else { "Open map" }
            ),
            (_, Some(v)) => html_escape(v),
            (_, None) => format!("<span style=\"color:#888\">{}</span>", unknown(lang)),
        };
        let _ = writeln!(
            h,
            "<tr><th align=\"left\" style=\"padding-right:12px\">{}</th><td>{cell}</td></tr>",
            html_escape(k)
        );
    }
    h.push_str("</table>\n");
    match &f.ack {
        Some(url) => {
            let _ = writeln!(
                h,
                "<p><a href=\"{}\" style=\"display:inline-block;padding:10px 18px;background:{colour};\
                 color:#fff;text-decoration:none;border-radius:4px\">{}</a></p>",
                html_escape(url),
                if zh { "确认已收到并处理" } else { "Acknowledge" }
            );
        }
        None => {
            let _ = writeln!(
                h,
                "<p>{}</p>",
                if zh {
                    "请登录控制台确认此警报。"
                } else {
                    "Please acknowledge this alert in the console."
                }
            );
        }
    }
    if let Some(url) = &f.console {
        let _ = writeln!(
            h,
            "<p><a href=\"{}\">{}</a></p>",
            html_escape(url),
            if zh {
                "打开控制台"
            } else {
                "Open the console"
            }
        );
    }
    let _ = write!(
        h,
        "<p style=\"color:#888;font-size:12px\">{}</p>\n</body></html>\n",
        if zh {
            "银龄守护（Silverguard）自动通知。确认前将持续提醒并逐级上报。"
        } else {
            "Silverguard automatic notice. It repeats and escalates until someone acknowledges."
        }
    );
    h
}

/// The SMS: severity, name, what, when, progress, detail and address, then the link last (so
/// a phone shows it whole and clickable). Parts are added in that order while they fit the
/// length target; the address, last, is cut rather than dropped when enough room is left.
fn sms(f: &Facts, view: &AlertView, lang: Lang) -> String {
    let zh = lang == Lang::ZhCn;
    let sep = if zh { "，" } else { ", " };
    let time = fmt_time_short(view.occurred_at);
    let mut head = if zh {
        format!("【{}】{}：{}{sep}{}", f.sev, plain(&f.name), f.label, time)
    } else {
        format!("[{}] {}: {}{sep}{}", f.sev, plain(&f.name), f.label, time)
    };
    let tail = match &f.ack {
        Some(url) => format!("{}{url}", if zh { "。确认：" } else { ". Ack: " }),
        None => if zh {
            "。请登录控制台确认"
        } else {
            ". Please ack in the console"
        }
        .to_string(),
    };
    let max = if zh {
        SMS_MAX_CHARS_ZH
    } else {
        SMS_MAX_CHARS_EN
    };
    // Keep at least the severity, name and kind even when the link is very long.
    let budget = max.saturating_sub(tail.chars().count()).max(24);
    let optional = f
        .progress
        .iter()
        .map(|p| format!("{sep}{p}"))
        .chain(f.detail.iter().map(|d| format!("{sep}{}", plain(d))));
    for part in optional {
        if head.chars().count() + part.chars().count() <= budget {
            head.push_str(&part);
        }
    }
    if let Some(a) = &f.address {
        let label = if zh { "。地址：" } else { ". Address: " };
        let room = budget
            .saturating_sub(head.chars().count())
            .saturating_sub(label.chars().count());
        // A stub of an address ("杭州…") helps nobody; only cut it when most can stay.
        if room >= 8 {
            head.push_str(label);
            head.push_str(&truncate(&plain(a), room));
        }
    }
    format!("{}{tail}", truncate(&head, budget))
}

fn markdown(f: &Facts, lang: Lang) -> String {
    let zh = lang == Lang::ZhCn;
    let colon = if zh { "：" } else { ": " };
    let mut m = String::new();
    let _ = writeln!(m, "### {} · {}", f.label, md(&f.name));
    let mut line = |k: &str, v: String| {
        let _ = writeln!(m, "> {k}{colon}{v}  ");
    };
    line(
        if zh { "级别" } else { "Severity" },
        format!("**{}**", f.sev),
    );
    if let Some(d) = &f.detail {
        line(if zh { "详情" } else { "Detail" }, md(d));
    }
    line(
        if zh { "时间" } else { "When" },
        format!("{}{}", f.time, if zh { "（北京时间）" } else { " (UTC+8)" }),
    );
    line(
        if zh { "地址" } else { "Address" },
        f.address
            .as_deref()
            .map(md)
            .unwrap_or_else(|| unknown(lang).into()),
    );
    line(
        if zh { "位置" } else { "Location" },
        match &f.map {
            Some(url) => format!("[{}]({url})", if zh { "查看地图" } else { "open map" }),
            None => unknown(lang).into(),
        },
    );
    if let Some(p) = &f.phone {
        line(if zh { "老人电话" } else { "Elder's phone" }, md(p));
    }
    line(
        if zh { "最新体征" } else { "Latest vitals" },
        f.vitals
            .as_deref()
            .map(md)
            .unwrap_or_else(|| unknown(lang).into()),
    );
    if !f.progress.is_empty() {
        line(
            if zh { "进度" } else { "Progress" },
            f.progress.join(if zh { "，" } else { ", " }),
        );
    }
    m.push('\n');
    let mut links = Vec::new();
    if let Some(url) = &f.ack {
        links.push(format!(
            "[{}]({url})",
            if zh { "一键确认" } else { "Acknowledge" }
        ));
    }
    if let Some(url) = &f.console {
        links.push(format!(
            "[{}]({url})",
            if zh {
                "打开控制台"
            } else {
                "Open console"
            }
        ));
    }
    if links.is_empty() {
        links.push(
            if zh {
                "请登录控制台确认"
            } else {
                "Please acknowledge in the console"
            }
            .to_string(),
        );
    }
    let _ = writeln!(m, "{}", links.join(" | "));
    m
}

/// Template variables for SMS providers that only send pre-approved templates (Aliyun's
/// `TemplateParam`): `name`, `kind`, `time` and `link`. Aliyun caps a variable's length
/// (35 characters for most variable types), so values are cut to fit.
pub fn sms_template_params(view: &AlertView, lang: Lang) -> BTreeMap<String, String> {
    let f = facts(view, lang);
    let mut p = BTreeMap::new();
    p.insert("name".into(), truncate(&plain(&f.name), 20));
    p.insert("kind".into(), truncate(f.label, 20));
    p.insert("time".into(), fmt_time_short(view.occurred_at));
    p.insert("link".into(), f.ack.unwrap_or_default());
    p
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    const KINDS: &[&str] = &[
        "sos",
        "fall",
        "fall_cancelled",
        "hr_high",
        "hr_low",
        "spo2_low",
        "temp_high",
        "bp_high",
        "device_silent",
        "not_worn",
        "low_battery",
        "geofence_exit",
        "wellness_check",
        "reminder",
    ];

    /// A 60-character acknowledge link, the length the SMS budget is designed for.
    const ACK: &str = "https://sg.example.org/a/1234567/k7Qx9pLm2VbN4tRw8yZc3dFgHjK";

    fn view(kind: &str) -> AlertView {
        AlertView {
            alert_id: 1234567,
            kind: kind.into(),
            severity: "critical".into(),
            elder_name: "王秀英".into(),
            elder_address: Some("杭州市西湖区文三路 128 号 3 幢 2 单元 501 室".into()),
            elder_phone: Some("13800138000".into()),
            device_id: "860000000000001".into(),
            occurred_at: Utc.with_ymd_and_hms(2026, 11, 23, 13, 5, 7).unwrap(),
            location: Some((30.2741, 120.1551)),
            vitals: Some(VitalsView {
                heart_rate_bpm: Some(142),
                spo2_pct: Some(93),
                systolic_mmhg: Some(150),
                diastolic_mmhg: Some(95),
                skin_temp_dc: Some(372),
                battery_pct: Some(64),
                at: Some(Utc.with_ymd_and_hms(2026, 11, 23, 13, 4, 0).unwrap()),
            }),
            ack_url: Some(ACK.into()),
            console_url: Some("https://sg.example.org/alerts/1234567".into()),
            escalation_step: 0,
            repeat_count: 0,
            detail: Some("HR 142 bpm for 2 min".into()),
        }
    }

    #[test]
    fn ack_fixture_is_sixty_chars() {
        assert_eq!(ACK.chars().count(), 60);
    }

    #[test]
    fn every_kind_renders_in_both_languages() {
        for kind in KINDS {
            for lang in [Lang::ZhCn, Lang::En] {
                let v = view(kind);
                let r = render(&v, lang);
                let label = kind_label(kind, lang);
                assert_ne!(
                    label,
                    kind_label("no-such-kind", lang),
                    "{kind} has its own label"
                );
                for (part, body) in [
                    ("subject", &r.subject),
                    ("text", &r.text),
                    ("html", &r.html),
                    ("sms", &r.sms),
                    ("im", &r.im_markdown),
                ] {
                    assert!(!body.trim().is_empty(), "{kind}/{lang} {part} empty");
                    assert!(
                        body.contains("王秀英"),
                        "{kind}/{lang} {part} lacks the name"
                    );
                }
                for (part, body) in [
                    ("subject", &r.subject),
                    ("text", &r.text),
                    ("im", &r.im_markdown),
                ] {
                    assert!(
                        body.contains(label),
                        "{kind}/{lang} {part} lacks the label {label}"
                    );
                }
                for (part, body) in [("text", &r.text), ("sms", &r.sms), ("im", &r.im_markdown)] {
                    assert!(
                        body.contains(ACK),
                        "{kind}/{lang} {part} lacks the ack link"
                    );
                }
                assert!(
                    r.html.contains(&format!("href=\"{ACK}\"")),
                    "{kind}/{lang} html ack link"
                );
                assert!(
                    r.sms.ends_with(ACK),
                    "{kind}/{lang}: the link goes last: {}",
                    r.sms
                );
                assert!(
                    r.text.contains("2026-11-23 21:05:07"),
                    "CST time in {kind}/{lang}"
                );
                let map = match lang {
                    Lang::ZhCn => "https://uri.amap.com/marker?position=120.155100,30.274100",
                    Lang::En => "https://www.openstreetmap.org/?mlat=30.274100&mlon=120.155100#map=17/30.274100/120.155100",
                };
                assert!(r.text.contains(map), "{kind}/{lang} map link: {}", r.text);
                assert!(r.im_markdown.contains(map), "{kind}/{lang} im map link");
                assert!(
                    r.html.contains(&html_escape(map)),
                    "{kind}/{lang} html map link"
                );
            }
        }
    }

    #[test]
    fn vitals_are_shown() {
        let r = render(&view("hr_high"), Lang::ZhCn);
        assert!(r.text.contains("心率 142 次/分"), "{}", r.text);
        assert!(r.text.contains("血压 150/95 mmHg"));
        assert!(r.text.contains("体温 37.2℃"));
        assert!(r.text.contains("HR 142 bpm for 2 min"), "detail shown");
        let r = render(&view("hr_high"), Lang::En);
        assert!(r
            .text
            .contains("HR 142 bpm, SpO2 93%, BP 150/95 mmHg, temp 37.2 °C, battery 64%"));
        assert!(r.text.contains("measured 2026-11-23 21:04:00"));
        let mut v = view("sos");
        v.vitals = None;
        v.location = None;
        let r = render(&v, Lang::En);
        assert!(r.text.contains("Latest vitals: unknown"));
        assert!(r.text.contains("Location: unknown"));
    }

    #[test]
    fn html_escapes_every_field() {
        let mut v = view("sos");
        v.elder_name = "<script>alert(1)</script>".into();
        v.elder_address = Some("\"><img src=x onerror=alert(1)>".into());
        v.detail = Some("a & b <b>".into());
        v.device_id = "<dev>".into();
        v.elder_phone = Some("<tel>".into());
        for lang in [Lang::ZhCn, Lang::En] {
            let r = render(&v, lang);
            assert!(!r.html.contains("<script>"), "{}", r.html);
            assert!(r.html.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
            assert!(!r.html.contains("<img"));
            assert!(r.html.contains("&quot;&gt;&lt;img"));
            assert!(r.html.contains("a &amp; b &lt;b&gt;"));
            assert!(!r.html.contains("<dev>") && !r.html.contains("<tel>"));
            assert!(
                !r.sms.contains('<') && !r.sms.contains('>'),
                "no markup in SMS: {}",
                r.sms
            );
            assert!(!r.im_markdown.contains("<script"), "{}", r.im_markdown);
        }
    }

    #[test]
    fn hostile_links_are_not_clickable() {
        let mut v = view("sos");
        v.ack_url = Some("javascript:alert(1)".into());
        v.console_url = Some("https://x.example/\"onmouseover=alert(1)".into());
        let r = render(&v, Lang::En);
        assert!(!r.html.contains("javascript:"));
        assert!(!r.html.contains("onmouseover"));
        assert!(!r.sms.contains("javascript:"));
        assert!(r.sms.contains("console"), "{}", r.sms);
    }

    #[test]
    fn newlines_in_fields_cannot_forge_lines() {
        let mut v = view("sos");
        v.elder_name = "Li\r\nBcc: evil@example.org".into();
        let r = render(&v, Lang::En);
        assert!(!r.subject.contains('\n') && !r.subject.contains('\r'));
        assert!(!r.text.lines().any(|l| l.starts_with("Bcc:")));
        assert!(!r.sms.contains('\n'));
    }

    #[test]
    fn sms_is_short_and_plain() {
        for kind in KINDS {
            let mut v = view(kind);
            v.escalation_step = 2;
            v.repeat_count = 3;
            v.elder_address = Some(
                "浙江省杭州市西湖区文三路街道文三路 128 号某某小区 3 幢 2 单元 501 室（进门左转）"
                    .into(),
            );
            let r = render(&v, Lang::ZhCn);
            let n = r.sms.chars().count();
            assert!(n <= 140, "{kind}: {n} chars: {}", r.sms);
            assert!(r.sms.ends_with(ACK));
            assert!(r.sms.contains("王秀英") && r.sms.contains(kind_label(kind, Lang::ZhCn)));
            let r = render(&v, Lang::En);
            assert!(r.sms.chars().count() <= 160, "{}", r.sms);
            assert!(r.sms.ends_with(ACK));
        }
        // A short one is not padded or cut.
        let mut v = view("sos");
        v.elder_address = None;
        v.detail = None;
        let r = render(&v, Lang::ZhCn);
        assert_eq!(
            r.sms,
            format!("【紧急】王秀英：紧急呼救 SOS，11-23 21:05。确认：{ACK}")
        );
    }

    #[test]
    fn escalation_and_repeats_show() {
        let mut v = view("sos");
        v.escalation_step = 1;
        v.repeat_count = 2;
        let zh = render(&v, Lang::ZhCn);
        for part in [&zh.subject, &zh.text, &zh.html, &zh.sms, &zh.im_markdown] {
            assert!(part.contains("第2次提醒"), "{part}");
            assert!(part.contains("已升级至第1级"), "{part}");
        }
        let en = render(&v, Lang::En);
        for part in [&en.subject, &en.text, &en.html, &en.sms, &en.im_markdown] {
            assert!(part.contains("reminder #2"), "{part}");
            assert!(part.contains("escalated to step 1"), "{part}");
        }
        let first = render(&view("sos"), Lang::En);
        assert!(!first.subject.contains("reminder") && !first.subject.contains("escalated"));
    }

    #[test]
    fn lang_parses_common_tags() {
        for t in ["zh-CN", "zh", "zh_cn", "ZH-Hans", " zh-CN "] {
            assert_eq!(Lang::parse(t), Some(Lang::ZhCn), "{t}");
        }
        for t in ["en", "en-US", "EN"] {
            assert_eq!(Lang::parse(t), Some(Lang::En), "{t}");
        }
        assert_eq!(Lang::parse("fr"), None);
        assert!("xx".parse::<Lang>().is_err());
        assert_eq!(Lang::ZhCn.as_str(), "zh-CN");
        assert_eq!(Lang::En.as_str(), "en");
    }

    #[test]
    fn bad_coordinates_give_no_link() {
        let mut v = view("geofence_exit");
        v.location = Some((f64::NAN, 120.0));
        assert!(render(&v, Lang::ZhCn).text.contains("位置：未知"));
        v.location = Some((95.0, 120.0));
        assert!(render(&v, Lang::En).text.contains("Location: unknown"));
    }

    #[test]
    fn template_params_fit_aliyun_limits() {
        let mut v = view("sos");
        v.elder_name = "一个非常非常非常非常非常非常非常长的名字超过二十个字".into();
        let p = sms_template_params(&v, Lang::ZhCn);
        assert_eq!(
            p.keys().cloned().collect::<Vec<_>>(),
            ["kind", "link", "name", "time"]
        );
        assert!(p["name"].chars().count() <= 20);
        assert_eq!(p["time"], "11-23 21:05");
        assert_eq!(p["link"], ACK);
        assert_eq!(p["kind"], "紧急呼救 SOS");
    }

    #[test]
    fn unknown_kind_and_severity_still_render() {
        let mut v = view("mystery");
        v.severity = "weird".into();
        let r = render(&v, Lang::En);
        assert!(r.subject.starts_with("[NOTICE] 王秀英: Health alert"));
    }
}
