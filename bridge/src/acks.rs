//! How the Kafka side tells the MQTT side which messages are safe to acknowledge.
//!
//! The MQTT task numbers every message it receives (`Message::seq`, rising by one). Order is
//! kept end to end, so the Kafka task finishes messages in that order too, and one number says
//! it all: every message up to the watermark is *done* — in Kafka, fsynced in the disk spool,
//! or given up on and counted (too large, dropped by the spool's full policy). The MQTT task
//! then sends its PUBACKs (PUBRECs for QoS 2) in receipt order, as MQTT requires.

use tokio::sync::watch;

/// Kafka side: reports progress. Cloneable; the watermark only ever rises.
#[derive(Clone, Debug)]
pub struct AckHandle(watch::Sender<u64>);

/// MQTT side: follows the watermark.
#[derive(Clone, Debug)]
pub struct AckWatermark(watch::Receiver<u64>);

/// A connected pair, starting at 0 (no message is numbered 0).
pub fn ack_channel() -> (AckHandle, AckWatermark) {
    let (tx, rx) = watch::channel(0);
    (AckHandle(tx), AckWatermark(rx))
}

impl AckHandle {
    /// Every message numbered `seq` or lower is done.
    pub fn done_through(&self, seq: u64) {
        self.0.send_if_modified(|current| {
            let rises = seq > *current;
            if rises {
                *current = seq;
            }
            rises
        });
    }
}

impl AckWatermark {
    /// The current watermark.
    pub fn get(&self) -> u64 {
        *self.0.borrow()
    }

    /// Waits until the watermark rises; `None` once the Kafka side is gone.
    pub async fn changed(&mut self) -> Option<u64> {
        self.0.changed().await.ok()?;
        Some(*self.0.borrow_and_update())
    }

    /// The watermark, if it rose since it was last seen, without waiting: a version check
    /// where [`Self::changed`] registers a waiter with the channel. `None` when it did not
    /// rise; a last rise is still seen once the Kafka side is gone (which [`Self::changed`]
    /// then reports).
    pub fn rose(&mut self) -> Option<u64> {
        match self.0.has_changed() {
            Ok(false) => None,
            Ok(true) | Err(_) => {
                let latest = self.0.borrow_and_update();
                latest.has_changed().then(|| *latest)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn watermark_only_rises() {
        let (handle, mut watermark) = ack_channel();
        handle.done_through(5);
        assert_eq!(watermark.changed().await, Some(5));
        handle.done_through(3);
        handle.done_through(9);
        assert_eq!(watermark.changed().await, Some(9));
        drop(handle);
        assert_eq!(watermark.changed().await, None);
    }

    #[tokio::test]
    async fn a_rise_is_seen_once_without_waiting() {
        let (handle, mut watermark) = ack_channel();
        assert_eq!(watermark.rose(), None);
        handle.done_through(4);
        handle.done_through(6);
        assert_eq!(watermark.rose(), Some(6));
        assert_eq!(watermark.rose(), None, "already seen");
        handle.done_through(7);
        assert_eq!(watermark.changed().await, Some(7));
        assert_eq!(watermark.rose(), None, "seen by changed");
        handle.done_through(9);
        drop(handle);
        assert_eq!(
            watermark.rose(),
            Some(9),
            "the last rise, after the Kafka side is gone"
        );
        assert_eq!(watermark.rose(), None);
        assert_eq!(watermark.changed().await, None);
    }
}
