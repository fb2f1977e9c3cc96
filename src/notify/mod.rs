//! Notify: the outbox worker and the channels it delivers through (email, SMS, IM group
//! robots, the command downlink to the bracelet), with zh-CN and en templates and signed
//! acknowledge links.

pub mod channels;
pub mod downlink;
pub mod links;
pub mod outbox;
pub mod settings;
pub mod templates;
