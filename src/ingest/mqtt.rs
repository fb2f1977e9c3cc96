//! MQTT settings shared by the service's connections: the broker's address, the TLS client
//! configuration, the rumqttc options of the downlink (which publishes), and the ingest
//! subscriptions' topic filters. The ingest connections themselves are in
//! [`super::session`].

use rumqttc::v5::mqttbytes::v5::ConnectProperties;
use rumqttc::v5::MqttOptions;

use crate::config::MqttSettings;

#[derive(Debug, thiserror::Error)]
pub enum MqttConfigError {
    #[error("mqtt.url {0:?}: {1}")]
    Url(String, String),
    #[error("mqtts:// needs TLS support: {0}")]
    Tls(String),
}

/// Outgoing QoS 1 publishes in flight: the downlink publishes one command at a time and
/// waits for its ack.
const OUTGOING_INFLIGHT: u16 = 64;

/// The broker's host, port, and whether to use TLS, from `mqtt.url`.
pub fn broker_address(settings: &MqttSettings) -> Result<(String, u16, bool), MqttConfigError> {
    let url = url::Url::parse(&settings.url)
        .map_err(|e| MqttConfigError::Url(settings.url.clone(), e.to_string()))?;
    let host = url
        .host_str()
        .ok_or_else(|| MqttConfigError::Url(settings.url.clone(), "no host".into()))?;
    let tls = match url.scheme() {
        "mqtts" | "ssl" => true,
        "mqtt" | "tcp" => false,
        other => {
            return Err(MqttConfigError::Url(
                settings.url.clone(),
                format!("scheme {other}:// (use mqtt:// or mqtts://)"),
            ))
        }
    };
    let port = url.port().unwrap_or(if tls { 8883 } else { 1883 });
    Ok((host.to_string(), port, tls))
}

/// The rumqttc options of this instance's publishing connection `{client_id}-{suffix}` (the
/// downlink). It keeps no session: a command not acknowledged is retried by its outbox.
pub fn publisher_options(
    settings: &MqttSettings,
    suffix: &str,
) -> Result<MqttOptions, MqttConfigError> {
    let (host, port, tls) = broker_address(settings)?;
    let client_id = format!("{}-{suffix}", settings.client_id);
    let mut opts = MqttOptions::new(client_id, host, port);
    opts.set_keep_alive(settings.keep_alive);
    opts.set_clean_start(true);
    opts.set_connect_properties(ConnectProperties {
        max_packet_size: Some(settings.max_packet_bytes),
        ..ConnectProperties::new()
    });
    // rumqttc allocates (and touches) one slot per outgoing in-flight packet id up front:
    // 65,535 slots, about 14 MiB per connection, by default. Subscriptions take their packet
    // ids from the same range, so it must stay above 1.
    opts.set_outgoing_inflight_upper_limit(OUTGOING_INFLIGHT);
    let mut net = rumqttc::NetworkOptions::new();
    net.set_tcp_nodelay(true);
    opts.set_network_options(net);
    if let (Some(user), Some(pass)) = (&settings.username, &settings.password) {
        opts.set_credentials(user.clone(), pass.expose().to_string());
    }
    if tls {
        opts.set_transport(rumqttc::Transport::tls_with_config(
            rumqttc::TlsConfiguration::Rustls(tls_client_config(settings)?),
        ));
    }
    Ok(opts)
}

/// The TLS client configuration for `mqtts://`: the broker is verified against
/// `mqtt.ca_file` alone (no fallback to the system roots). Shared by the ingest sessions and
/// the downlink, so both trust the same CAs.
pub fn tls_client_config(
    settings: &MqttSettings,
) -> Result<std::sync::Arc<rustls::ClientConfig>, MqttConfigError> {
    use rustls::pki_types::{pem::PemObject, CertificateDer};
    let Some(path) = &settings.ca_file else {
        return Err(MqttConfigError::Tls(
            "set mqtt.ca_file (SILVERGUARD_MQTT__CA_FILE) to the broker's CA bundle".into(),
        ));
    };
    let pem = std::fs::read(path)
        .map_err(|e| MqttConfigError::Tls(format!("cannot read mqtt.ca_file {path}: {e}")))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| MqttConfigError::Tls(format!("mqtt.ca_file {path}: {e}")))?;
        roots
            .add(cert)
            .map_err(|e| MqttConfigError::Tls(format!("mqtt.ca_file {path}: {e}")))?;
    }
    if roots.is_empty() {
        return Err(MqttConfigError::Tls(format!(
            "mqtt.ca_file {path} holds no certificate"
        )));
    }
    let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| MqttConfigError::Tls(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(std::sync::Arc::new(config))
}

pub fn subscription_filter(settings: &MqttSettings) -> String {
    if settings.shared_group.is_empty() {
        settings.topic_filter.clone()
    } else {
        format!("$share/{}/{}", settings.shared_group, settings.topic_filter)
    }
}

/// The device event topics, as a filter.
pub const EVENT_TOPICS: &str = "sg/v1/dev/+/evt";

/// Whether an MQTT topic filter matches a topic (`+` one level, `#` the rest).
pub fn filter_matches(filter: &str, topic: &str) -> bool {
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// The subscription of the dedicated event connection, when the configured filter takes
/// device events at all (`None`: it does not, so there is nothing to separate).
///
/// Why a connection of its own: acknowledgements go out in receive order and only after
/// commit, so on a connection that carries heartbeats the broker's in-flight window is
/// mostly heartbeats waiting for their batch. An SOS queued behind a full window waits for
/// a whole batch commit before the broker even sends it. On its own connection (its own
/// session, its own window) an SOS is sent at once. The main connections still receive
/// events too (their filter covers them, and MQTT has no "all but"); that copy is written
/// with `ON CONFLICT DO NOTHING` and makes no second row and no second alert, and it keeps an
/// event safe even if the event session were missing when it was published.
pub fn event_filter(settings: &MqttSettings) -> Option<String> {
    if !filter_matches(&settings.topic_filter, "sg/v1/dev/x/evt") {
        return None;
    }
    Some(if settings.shared_group.is_empty() {
        EVENT_TOPICS.to_string()
    } else {
        format!("$share/{}/{EVENT_TOPICS}", settings.shared_group)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_match_like_a_broker() {
        assert!(filter_matches("sg/#", "sg/v1/dev/x/evt"));
        assert!(filter_matches("#", "sg/v1/dev/x/evt"));
        assert!(filter_matches("sg/v1/dev/+/evt", "sg/v1/dev/x/evt"));
        assert!(filter_matches("sg/+/dev/+/+", "sg/v1/dev/x/evt"));
        assert!(!filter_matches("sg/v1/dev/+/hb", "sg/v1/dev/x/evt"));
        assert!(!filter_matches("sg/v1/dev/+", "sg/v1/dev/x/evt"));
        assert!(!filter_matches("sg/v1/dev/+/evt/x", "sg/v1/dev/x/evt"));
    }

    #[test]
    fn events_get_their_own_subscription_when_the_filter_takes_them() {
        let mut m = MqttSettings::default();
        assert_eq!(event_filter(&m).as_deref(), Some("sg/v1/dev/+/evt"));
        m.shared_group = "g".into();
        assert_eq!(
            event_filter(&m).as_deref(),
            Some("$share/g/sg/v1/dev/+/evt")
        );
        m.topic_filter = "sg/v1/dev/+/hb".into();
        assert_eq!(event_filter(&m), None);
    }
}
