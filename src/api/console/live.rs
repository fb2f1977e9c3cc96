//! The live board's feed: ONE `LISTEN sg_alert_changed` connection per process, fanned out to
//! every open board through a tokio broadcast channel.
//!
//! The trigger on `alerts` (migrations/0004_console.sql) announces every insert and update,
//! whichever instance made it, so a board connected to instance A sees the SOS that
//! instance B opened. Each SSE subscriber then checks the alert against its own user's scope
//! in the database before sending anything (see `sse.rs`).
//!
//! Notifications are lost while the LISTEN connection is down; when it comes back (and when
//! a slow subscriber falls behind the channel) subscribers are told to resync: the browser
//! reloads the board's rows.

use std::time::Duration;

use futures::StreamExt;
use serde::Deserialize;
use tokio::sync::broadcast;
use tokio_postgres::NoTls;
use tokio_util::sync::CancellationToken;

/// The payload of `sg_alert_changed`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct AlertChange {
    pub id: i64,
    pub elder_id: Option<i64>,
    pub kind: String,
    pub severity: String,
    pub status: String,
    pub repeat_count: i32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LiveMsg {
    Changed(AlertChange),
    /// Changes may have been missed: reload the whole board.
    Resync,
}

pub const CHANNEL: &str = "sg_alert_changed";

/// Shared by the HTTP handlers (in `ApiState`): subscribe to changes, and a token that ends
/// every open stream at shutdown (so graceful shutdown does not wait on idle boards).
#[derive(Clone)]
pub struct LiveHub {
    tx: broadcast::Sender<LiveMsg>,
    stop: CancellationToken,
}

impl Default for LiveHub {
    fn default() -> Self {
        LiveHub::idle()
    }
}

impl LiveHub {
    /// A hub that never hears from the database (for tools and tests that serve HTTP only).
    pub fn idle() -> LiveHub {
        let (tx, _) = broadcast::channel(1024);
        LiveHub {
            tx,
            stop: CancellationToken::new(),
        }
    }

    /// Starts the process's LISTEN task on `database_url`.
    pub fn start(database_url: String) -> LiveHub {
        let hub = LiveHub::idle();
        tokio::spawn(listen(database_url, hub.tx.clone(), hub.stop.clone()));
        hub
    }

    pub fn subscribe(&self) -> broadcast::Receiver<LiveMsg> {
        self.tx.subscribe()
    }

    /// Sends a message to every subscriber of this process (tests; an admin "resync").
    pub fn publish(&self, msg: LiveMsg) {
        let _ = self.tx.send(msg);
    }

    pub fn stopping(&self) -> CancellationToken {
        self.stop.clone()
    }

    /// Ends the LISTEN task and every open stream.
    pub fn stop(&self) {
        self.stop.cancel();
    }

    pub fn subscribers(&self) -> usize {
        self.tx.receiver_count()
    }
}

async fn listen(url: String, tx: broadcast::Sender<LiveMsg>, cancel: CancellationToken) {
    loop {
        let attempt = async {
            let cfg: tokio_postgres::Config = url.parse()?;
            let (client, mut connection) = cfg.connect(NoTls).await?;
            let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
            {
                let listen = client.batch_execute("LISTEN sg_alert_changed");
                tokio::pin!(listen);
                loop {
                    tokio::select! {
                        r = &mut listen => { r?; break; }
                        m = messages.next() => match m {
                            Some(Ok(_)) => {}
                            Some(Err(e)) => return Err(e),
                            None => return Ok(()),
                        }
                    }
                }
            }
            tracing::debug!("console: listening on {CHANNEL}");
            // Whatever happened while we were not listening, boards must reload.
            let _ = tx.send(LiveMsg::Resync);
            while let Some(m) = messages.next().await {
                if let tokio_postgres::AsyncMessage::Notification(n) = m? {
                    match serde_json::from_str::<AlertChange>(n.payload()) {
                        Ok(change) => {
                            let _ = tx.send(LiveMsg::Changed(change));
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, payload = n.payload(), "console: bad {CHANNEL} payload")
                        }
                    }
                }
            }
            drop(client);
            Ok::<(), tokio_postgres::Error>(())
        };
        tokio::select! {
            _ = cancel.cancelled() => return,
            r = attempt => if let Err(e) = r {
                tracing::warn!(error = %e, "console: LISTEN connection lost; reconnecting");
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_trigger_payload() {
        let c: AlertChange = serde_json::from_str(
            r#"{"id": 7, "elder_id": null, "kind": "sos", "severity": "critical", "status": "open", "repeat_count": 1}"#,
        )
        .unwrap();
        assert_eq!(c.id, 7);
        assert_eq!(c.elder_id, None);
        assert_eq!(c.status, "open");
    }

    #[tokio::test]
    async fn subscribers_receive_published_messages() {
        let hub = LiveHub::idle();
        let mut rx = hub.subscribe();
        hub.publish(LiveMsg::Resync);
        assert_eq!(rx.recv().await.unwrap(), LiveMsg::Resync);
        assert_eq!(hub.subscribers(), 1);
    }
}
