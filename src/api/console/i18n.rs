//! The console's words in Simplified Chinese and English.
//!
//! One table, looked up by key from the templates (`{{ c.t("board.title") }}`). A key that is
//! missing renders as itself, and a unit test checks that every key used in `templates/`
//! exists, so a typo shows up in CI rather than on a grid worker's phone.

use crate::notify::templates::Lang;

/// (key, Chinese, English)
const WORDS: &[(&str, &str, &str)] = &[
    ("app.name", "银龄守护", "Silverguard"),
    (
        "app.tagline",
        "独居老人智能手环值守台",
        "Watch over elders who live alone",
    ),
    // navigation
    ("nav.board", "告警看板", "Alert board"),
    ("nav.elders", "老人", "Elders"),
    ("nav.fleet", "手环", "Bracelets"),
    ("nav.dashboard", "统计", "Dashboard"),
    ("nav.work_orders", "工单", "Work orders"),
    ("nav.logout", "退出", "Log out"),
    ("nav.lang_other", "English", "中文"),
    ("nav.lang_other_code", "en", "zh-CN"),
    // login
    ("login.title", "登录", "Log in"),
    ("login.username", "用户名", "Username"),
    ("login.password", "密码", "Password"),
    ("login.submit", "登录", "Log in"),
    (
        "login.rejected",
        "用户名或密码错误",
        "Wrong username or password",
    ),
    (
        "login.rate_limited",
        "尝试次数过多，请稍后再试（秒）：",
        "Too many attempts; try again in (seconds): ",
    ),
    (
        "login.failed",
        "暂时无法登录，请稍后重试",
        "Cannot log in right now; please retry",
    ),
    ("login.logged_out", "已退出登录", "You have logged out"),
    // roles
    ("role.admin", "管理员", "Administrator"),
    ("role.supervisor", "主管", "Supervisor"),
    ("role.grid_worker", "网格员", "Grid worker"),
    ("role.guardian", "监护人", "Guardian"),
    // board
    ("board.title", "实时告警", "Live alerts"),
    ("board.empty", "当前没有未处理的告警", "No active alerts"),
    ("board.live", "实时连接", "Live"),
    (
        "board.offline",
        "连接中断，正在重连…",
        "Connection lost, reconnecting…",
    ),
    ("board.sound_on", "提示音：开", "Sound: on"),
    ("board.sound_off", "开启提示音", "Enable sound"),
    (
        "board.sound_blocked",
        "点击任意处以启用提示音",
        "Tap anywhere to allow sound",
    ),
    ("board.new_sos", "新的紧急告警！", "New emergency alert!"),
    ("board.repeat", "次", "×"),
    // columns and fields
    ("col.elder", "老人", "Elder"),
    ("col.kind", "类型", "Kind"),
    ("col.severity", "级别", "Severity"),
    ("col.status", "状态", "Status"),
    ("col.age", "时长", "Age"),
    ("col.grid", "网格", "Grid"),
    ("col.opened", "发生时间", "Opened"),
    ("col.device", "手环", "Bracelet"),
    ("col.battery", "电量", "Battery"),
    ("col.last_seen", "最后上报", "Last seen"),
    ("col.worn", "佩戴", "Worn"),
    ("col.online", "在线", "Online"),
    ("col.model", "型号", "Model"),
    ("col.region", "区域", "Region"),
    ("col.when", "时间", "When"),
    ("col.who", "人员", "Who"),
    ("col.channel", "渠道", "Channel"),
    ("col.entry", "事件", "Entry"),
    ("col.detail", "详情", "Detail"),
    ("col.notes", "备注", "Notes"),
    ("col.category", "类别", "Category"),
    ("col.description", "说明", "Description"),
    ("col.helper", "服务人员", "Helper"),
    ("col.cost", "费用（元）", "Cost (yuan)"),
    ("col.actions", "操作", "Actions"),
    ("col.phone", "电话", "Phone"),
    ("col.role", "角色", "Role"),
    ("col.name", "姓名", "Name"),
    ("col.visits", "走访", "Visits"),
    ("col.calls", "电话", "Calls"),
    ("col.compliant", "本周达标", "This week"),
    // statuses
    ("status.open", "待处理", "Open"),
    ("status.acknowledged", "已确认", "Acknowledged"),
    ("status.resolved", "已解决", "Resolved"),
    ("yes", "是", "yes"),
    ("no", "否", "no"),
    ("unknown", "未知", "unknown"),
    ("none", "无", "none"),
    // alert page
    ("alert.title", "告警详情", "Alert"),
    ("alert.address", "地址", "Address"),
    ("alert.phone", "老人电话", "Elder's phone"),
    ("alert.location", "位置", "Location"),
    ("alert.map_amap", "高德地图", "Amap"),
    ("alert.map_osm", "OpenStreetMap", "OpenStreetMap"),
    (
        "alert.location_from_alert",
        "告警时手环定位",
        "Bracelet position at the alert",
    ),
    ("alert.location_home", "家庭住址坐标", "Home location"),
    ("alert.vitals", "最近体征", "Recent vitals"),
    ("alert.timeline", "处理记录", "Timeline"),
    ("alert.ack", "确认，我来处理", "Acknowledge — I'm on it"),
    ("alert.resolve", "解决并关闭", "Resolve"),
    (
        "alert.resolve_note",
        "处理说明（必填）",
        "What was done (required)",
    ),
    (
        "alert.note_required",
        "请填写处理说明",
        "Please write what was done",
    ),
    ("alert.acked_by", "确认人", "Acknowledged by"),
    ("alert.resolved_by", "解决人", "Resolved by"),
    (
        "alert.done_ack",
        "已确认，升级通知已停止",
        "Acknowledged: escalation has stopped",
    ),
    ("alert.done_resolve", "告警已解决", "Alert resolved"),
    (
        "alert.already",
        "该告警已被他人处理",
        "Someone else has already handled this alert",
    ),
    ("alert.repeats", "重复次数", "Repeats"),
    ("alert.contacts", "联系人", "Contacts"),
    ("alert.open_elder", "查看老人档案", "Elder's record"),
    (
        "alert.no_elder",
        "该手环未绑定老人",
        "This bracelet is not bound to an elder",
    ),
    // timeline entries
    ("tl.opened", "告警产生", "opened"),
    ("tl.repeated", "重复触发", "repeated"),
    ("tl.pressed_again", "再次按下", "pressed again"),
    ("tl.waiting", "等待取消窗口", "waiting for cancel window"),
    ("tl.notified", "已通知", "notified"),
    ("tl.escalated", "已升级", "escalated"),
    ("tl.no_recipients", "无可通知对象", "no one to notify"),
    ("tl.reminder", "提醒", "reminder"),
    ("tl.acknowledged", "已确认", "acknowledged"),
    ("tl.resolved", "已解决", "resolved"),
    ("tl.auto_resolved", "自动解除", "auto-resolved"),
    (
        "tl.cancelled_by_wearer",
        "佩戴者取消",
        "cancelled by the wearer",
    ),
    (
        "tl.wearer_cancel_ignored",
        "佩戴者取消未采纳",
        "wearer's cancel ignored",
    ),
    ("tl.delivered", "已送达", "delivered"),
    ("tl.delivery_failed", "发送失败", "delivery failed"),
    ("tl.delivery_retry", "重试发送", "retrying delivery"),
    ("tl.deferred", "延后发送", "deferred"),
    ("tl.fallback_queued", "改用备用渠道", "fallback queued"),
    ("tl.suppressed", "已抑制", "suppressed"),
    ("tl.cancelled", "已取消发送", "cancelled"),
    ("tl.no_fallback", "无备用渠道", "no fallback"),
    // vitals
    ("vital.hr", "心率", "Heart rate"),
    ("vital.spo2", "血氧", "SpO2"),
    ("vital.bp", "血压", "Blood pressure"),
    ("vital.temp", "体温", "Temperature"),
    ("vital.steps", "步数", "Steps"),
    ("vital.measured", "测量时间", "Measured"),
    ("vital.charts", "24 小时体征", "Vitals, last 24 hours"),
    ("vital.no_data", "暂无数据", "No data"),
    // elder page
    ("elder.profile", "基本信息", "Profile"),
    ("elder.age", "年龄", "Age"),
    ("elder.gender", "性别", "Gender"),
    ("elder.female", "女", "female"),
    ("elder.male", "男", "male"),
    ("elder.categories", "类别", "Categories"),
    ("elder.conditions", "疾病", "Conditions"),
    ("elder.medications", "用药", "Medications"),
    ("elder.notes", "备注", "Notes"),
    ("elder.devices", "手环", "Bracelets"),
    ("elder.events", "最近事件", "Recent events"),
    ("elder.alerts", "最近告警", "Recent alerts"),
    ("elder.care", "走访与电话", "Visits and calls"),
    (
        "elder.care_record",
        "记录一次走访或电话",
        "Record a visit or call",
    ),
    ("elder.care_saved", "已记录", "Recorded"),
    ("elder.work_orders", "服务工单", "Work orders"),
    ("elder.wo_create", "新建工单", "New work order"),
    ("elder.wo_created", "工单已创建", "Work order created"),
    ("elder.list_title", "老人名单", "Elders"),
    ("elder.search", "搜索姓名", "Search by name"),
    ("elder.search_go", "查询", "Search"),
    (
        "elder.only_noncompliant",
        "只看本周未达标",
        "Only not visited/called enough this week",
    ),
    ("care.visit", "上门走访", "Home visit"),
    ("care.call", "电话问候", "Phone call"),
    ("care.kind", "方式", "Kind"),
    ("care.at", "时间", "When"),
    ("care.save", "保存", "Save"),
    ("cat.living_alone", "独居", "living alone"),
    ("cat.empty_nest", "空巢", "empty-nest"),
    ("cat.left_behind", "留守", "left-behind"),
    ("cat.special_hardship", "特困", "special hardship"),
    ("contact.grid_worker", "网格员", "grid worker"),
    (
        "contact.backup_grid_worker",
        "备岗网格员",
        "backup grid worker",
    ),
    ("contact.guardian", "监护人", "guardian"),
    (
        "contact.community_supervisor",
        "社区主管",
        "community supervisor",
    ),
    (
        "contact.township_supervisor",
        "街道主管",
        "township supervisor",
    ),
    // events
    ("event.sos", "SOS 呼救", "SOS"),
    ("event.fall", "跌倒", "Fall"),
    ("event.sos_cancel", "取消呼救", "SOS cancelled"),
    ("event.worn_off", "摘下手环", "Taken off"),
    ("event.worn_on", "戴上手环", "Put on"),
    ("event.low_battery", "电量低", "Low battery"),
    ("event.power_off", "关机", "Powered off"),
    ("event.service_call", "服务呼叫", "Service call"),
    // fleet
    ("fleet.title", "手环状态", "Bracelet fleet"),
    ("fleet.silent", "失联", "Silent"),
    ("fleet.silent_count", "失联手环", "Silent bracelets"),
    ("fleet.low_battery", "低电量", "Low battery"),
    ("fleet.total", "手环总数", "Bracelets"),
    ("fleet.never", "从未上报", "never"),
    ("fleet.unbound", "未绑定", "unbound"),
    // dashboard
    ("dash.title", "区域统计", "Regions"),
    ("dash.open", "未解决告警", "Unresolved alerts"),
    ("dash.open_critical", "其中紧急", "of them emergencies"),
    ("dash.alerts_since", "期间告警数", "Alerts in window"),
    ("dash.tta_p50", "确认用时 P50", "Time to ack p50"),
    ("dash.tta_p95", "确认用时 P95", "Time to ack p95"),
    ("dash.within60", "60 秒内确认率", "Acked within 60 s"),
    (
        "dash.target",
        "目标：97.5% 的告警在 60 秒内有人确认（低于目标标红）",
        "Target: 97.5% of alerts acknowledged by a person within 60 s (red when below)",
    ),
    (
        "dash.compliance",
        "本周走访达标",
        "Visit compliance this week",
    ),
    ("dash.window", "统计周期（天）", "Window (days)"),
    (
        "dash.no_regions",
        "您没有可查看的区域",
        "You have no regions to oversee",
    ),
    ("level.city", "市", "city"),
    ("level.township", "街道/乡镇", "township"),
    ("level.community", "社区/村", "community"),
    ("level.grid", "网格", "grid"),
    // work orders
    ("wo.title", "服务工单", "Work orders"),
    ("wo.all", "全部", "All"),
    ("wo.open", "未完成", "Open"),
    ("wo.dispatch", "派单", "Dispatch"),
    ("wo.accept", "已接单", "Accepted"),
    ("wo.complete", "完成", "Complete"),
    ("wo.cancel", "取消", "Cancel"),
    ("wo.helper_name", "服务人员姓名", "Helper's name"),
    ("wo.helper_phone", "服务人员电话", "Helper's phone"),
    ("wo.cost", "费用（元）", "Cost (yuan)"),
    ("wo.note", "完成说明", "Completion note"),
    ("wo.empty", "没有工单", "No work orders"),
    ("wo.updated", "工单已更新", "Work order updated"),
    ("wo.source.device", "手环呼叫", "bracelet"),
    ("wo.source.console", "控制台", "console"),
    ("wo.source.api", "接口", "API"),
    ("wo.status.new", "新建", "new"),
    ("wo.status.dispatched", "已派单", "dispatched"),
    ("wo.status.accepted", "已接单", "accepted"),
    ("wo.status.completed", "已完成", "completed"),
    ("wo.status.cancelled", "已取消", "cancelled"),
    ("wo.cat.meals", "助餐", "meals"),
    ("wo.cat.medicine", "购药/送药", "medicine"),
    ("wo.cat.housekeeping", "家政保洁", "housekeeping"),
    ("wo.cat.repair", "维修", "repair"),
    ("wo.cat.escort", "陪同就医", "escort"),
    ("wo.cat.other", "其他", "other"),
    // errors
    (
        "err.not_found",
        "没有找到，或您无权查看",
        "Not found, or not yours to see",
    ),
    (
        "err.csrf",
        "表单已过期，请刷新页面后重试",
        "This form has expired; reload the page and retry",
    ),
    (
        "err.unavailable",
        "暂时无法访问，请稍后重试",
        "Temporarily unavailable; please retry",
    ),
    ("err.invalid", "输入有误", "Please check the form"),
    ("err.back", "返回看板", "Back to the board"),
];

pub fn t(lang: Lang, key: &str) -> &'static str {
    match WORDS.iter().find(|(k, _, _)| *k == key) {
        Some((_, zh, en)) => match lang {
            Lang::ZhCn => zh,
            Lang::En => en,
        },
        None => {
            tracing::debug!(key, "console: missing translation");
            // Leak-free fallback: the key itself is 'static only if it came from a template
            // literal, so answer a fixed marker instead.
            "?"
        }
    }
}

pub fn has(key: &str) -> bool {
    WORDS.iter().any(|(k, _, _)| *k == key)
}

pub fn status_label(status: &str, lang: Lang) -> &'static str {
    t(lang, &format!("status.{status}"))
}

pub fn severity_label(sev: &str, lang: Lang) -> &'static str {
    match (sev, lang) {
        ("critical", Lang::ZhCn) => "紧急",
        ("high", Lang::ZhCn) => "高",
        ("medium", Lang::ZhCn) => "中",
        ("low", Lang::ZhCn) => "低",
        (_, Lang::ZhCn) => "提示",
        ("critical", Lang::En) => "critical",
        ("high", Lang::En) => "high",
        ("medium", Lang::En) => "medium",
        ("low", Lang::En) => "low",
        (_, Lang::En) => "notice",
    }
}

/// A label for `prefix.value`, or the raw value when the table has none.
pub fn label_or(lang: Lang, prefix: &str, value: &str) -> String {
    let key = format!("{prefix}.{value}");
    if has(&key) {
        t(lang, &key).to_string()
    } else {
        value.to_string()
    }
}

/// "3 分钟前" / "3 min ago".
pub fn age(secs: i64, lang: Lang) -> String {
    let s = secs.max(0);
    match lang {
        Lang::ZhCn => match s {
            0..=59 => format!("{s} 秒前"),
            60..=3599 => format!("{} 分钟前", s / 60),
            3600..=86_399 => format!("{} 小时 {} 分前", s / 3600, (s % 3600) / 60),
            _ => format!("{} 天前", s / 86_400),
        },
        Lang::En => match s {
            0..=59 => format!("{s} s ago"),
            60..=3599 => format!("{} min ago", s / 60),
            3600..=86_399 => format!("{} h {} min ago", s / 3600, (s % 3600) / 60),
            _ => format!("{} d ago", s / 86_400),
        },
    }
}

/// A duration in seconds, short: "45 秒", "2 分 5 秒" / "45 s", "2 min 5 s".
pub fn duration(secs: f64, lang: Lang) -> String {
    let s = secs.max(0.0).round() as i64;
    match lang {
        Lang::ZhCn if s < 60 => format!("{s} 秒"),
        Lang::ZhCn if s < 3600 => format!("{} 分 {} 秒", s / 60, s % 60),
        Lang::ZhCn => format!("{} 小时 {} 分", s / 3600, (s % 3600) / 60),
        Lang::En if s < 60 => format!("{s} s"),
        Lang::En if s < 3600 => format!("{} min {} s", s / 60, s % 60),
        Lang::En => format!("{} h {} min", s / 3600, (s % 3600) / 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_unique() {
        let mut seen = std::collections::HashSet::new();
        for (k, zh, en) in WORDS {
            assert!(seen.insert(*k), "duplicate key {k}");
            assert!(!zh.is_empty() && !en.is_empty(), "{k}");
        }
    }

    #[test]
    fn every_key_used_in_templates_exists() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("templates/console");
        let mut checked = 0;
        for entry in std::fs::read_dir(&dir).expect("templates/console") {
            let path = entry.expect("entry").path();
            let text = std::fs::read_to_string(&path).expect("template");
            for (i, _) in text.match_indices("c.t(\"") {
                let rest = &text[i + 5..];
                let key = &rest[..rest.find('"').expect("closing quote")];
                assert!(has(key), "{}: unknown key {key:?}", path.display());
                checked += 1;
            }
        }
        assert!(checked > 50, "found only {checked} keys");
    }

    #[test]
    fn ages_read_naturally() {
        assert_eq!(age(5, Lang::ZhCn), "5 秒前");
        assert_eq!(age(125, Lang::En), "2 min ago");
        assert_eq!(age(7260, Lang::ZhCn), "2 小时 1 分前");
        assert_eq!(duration(42.4, Lang::En), "42 s");
        assert_eq!(duration(125.0, Lang::ZhCn), "2 分 5 秒");
        assert_eq!(status_label("open", Lang::ZhCn), "待处理");
        assert_eq!(label_or(Lang::En, "cat", "weird"), "weird");
    }
}
