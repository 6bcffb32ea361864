//! Which offsets may be committed: per partition, the offset below which every record's
//! publish was acknowledged by the MQTT broker. A record acknowledged out of order (a later
//! one before an earlier one) waits until everything before it is acknowledged.

use std::collections::{BTreeSet, HashMap};

/// A topic and partition.
pub(crate) type Partition = (String, i32);

#[derive(Debug, Default)]
struct State {
    /// Offsets started and not yet acknowledged.
    in_flight: BTreeSet<i64>,
    /// The next offset to commit (one past the last record acknowledged with everything before
    /// it), once there is one.
    committable: Option<i64>,
    /// The highest offset started so far.
    highest: Option<i64>,
    /// What was last committed, so an unchanged position is not committed again.
    committed: Option<i64>,
}

/// The commit positions of every partition the downlink has seen.
#[derive(Debug, Default)]
pub(crate) struct Offsets {
    partitions: HashMap<Partition, State>,
}

impl Offsets {
    /// A record at `offset` was taken and is on its way to the broker.
    pub(crate) fn start(&mut self, partition: &Partition, offset: i64) {
        let state = self.partitions.entry(partition.clone()).or_default();
        state.in_flight.insert(offset);
        state.highest = Some(state.highest.map_or(offset, |h| h.max(offset)));
    }

    /// The record at `offset` is acknowledged (or given up on, counted).
    pub(crate) fn done(&mut self, partition: &Partition, offset: i64) {
        let Some(state) = self.partitions.get_mut(partition) else {
            return;
        };
        if !state.in_flight.remove(&offset) {
            return;
        }
        // Everything below the first record still in flight is acknowledged.
        let next = match state.in_flight.first() {
            Some(&first) => first,
            None => state.highest.map_or(offset, |h| h) + 1,
        };
        if state.committable.is_none_or(|c| next > c) {
            state.committable = Some(next);
        }
    }

    /// Records started and not acknowledged.
    pub(crate) fn in_flight(&self) -> usize {
        self.partitions.values().map(|s| s.in_flight.len()).sum()
    }

    /// The positions to commit now (each one past what is acknowledged), each returned once.
    pub(crate) fn take_positions(&mut self) -> Vec<(Partition, i64)> {
        let mut positions = Vec::new();
        for (partition, state) in &mut self.partitions {
            if let Some(next) = state.committable
                && state.committed != Some(next)
            {
                state.committed = Some(next);
                positions.push((partition.clone(), next));
            }
        }
        positions.sort();
        positions
    }

    /// Positions whose commit failed: returned by the next [`Offsets::take_positions`] again.
    pub(crate) fn recommit(&mut self, positions: &[(Partition, i64)]) {
        for (partition, _) in positions {
            if let Some(state) = self.partitions.get_mut(partition) {
                state.committed = None;
            }
        }
    }

    /// Stops tracking a partition the consumer group took away: nothing more is committed for
    /// it, and acknowledgements of its records still in flight change nothing. Given back
    /// later, it starts afresh from its committed offset.
    pub(crate) fn forget(&mut self, partition: &Partition) {
        self.partitions.remove(partition);
    }

    /// Abandons every record in flight (their publishes may be lost) and returns, per
    /// partition, the offset to read again from: the first record not acknowledged.
    pub(crate) fn abandon(&mut self) -> Vec<(Partition, i64)> {
        let mut rewind = Vec::new();
        for (partition, state) in &mut self.partitions {
            if let Some(&first) = state.in_flight.first() {
                rewind.push((partition.clone(), first));
            }
            state.in_flight.clear();
            state.highest = state.committable.map(|c| c - 1);
        }
        rewind.sort();
        rewind
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(n: i32) -> Partition {
        ("down".to_owned(), n)
    }

    #[test]
    fn commits_only_below_the_first_record_still_in_flight() {
        let mut offsets = Offsets::default();
        for offset in 10..15 {
            offsets.start(&p(0), offset);
        }
        offsets.done(&p(0), 12);
        offsets.done(&p(0), 13);
        // A position is the next offset to read: 10 and 11 are not acknowledged, so 10.
        assert_eq!(offsets.take_positions(), [(p(0), 10)]);
        offsets.done(&p(0), 10);
        assert_eq!(offsets.take_positions(), [(p(0), 11)]);
        assert_eq!(offsets.take_positions(), [], "each position once");
        offsets.done(&p(0), 11);
        assert_eq!(
            offsets.take_positions(),
            [(p(0), 14)],
            "12 and 13 were already done"
        );
        offsets.done(&p(0), 14);
        assert_eq!(offsets.take_positions(), [(p(0), 15)]);
        assert_eq!(offsets.in_flight(), 0);
    }

    #[test]
    fn partitions_are_independent() {
        let mut offsets = Offsets::default();
        offsets.start(&p(0), 1);
        offsets.start(&p(1), 7);
        offsets.start(&p(1), 8);
        offsets.done(&p(1), 7);
        assert_eq!(offsets.take_positions(), [(p(1), 8)]);
        offsets.done(&p(0), 1);
        assert_eq!(offsets.take_positions(), [(p(0), 2)]);
    }

    #[test]
    fn a_revoked_partition_commits_nothing_more() {
        let mut offsets = Offsets::default();
        for offset in 0..3 {
            offsets.start(&p(0), offset);
            offsets.start(&p(1), offset);
        }
        offsets.done(&p(0), 0);
        offsets.forget(&p(0));
        assert_eq!(offsets.in_flight(), 3, "only partition 1's records remain");
        // Acknowledgements of the revoked partition's publishes arrive afterwards.
        offsets.done(&p(0), 1);
        offsets.done(&p(0), 2);
        offsets.done(&p(1), 0);
        assert_eq!(offsets.take_positions(), [(p(1), 1)]);
        // Given back, it is read again from its last commit: tracked afresh.
        offsets.start(&p(0), 0);
        assert_eq!(offsets.in_flight(), 3);
        offsets.done(&p(0), 0);
        assert_eq!(offsets.take_positions(), [(p(0), 1)]);
    }

    #[test]
    fn abandoning_rewinds_each_partition_to_its_first_unacknowledged_record() {
        let mut offsets = Offsets::default();
        for offset in 0..5 {
            offsets.start(&p(0), offset);
        }
        offsets.start(&p(1), 3);
        offsets.done(&p(0), 0);
        offsets.done(&p(0), 2);
        assert_eq!(offsets.abandon(), [(p(0), 1), (p(1), 3)]);
        assert_eq!(offsets.in_flight(), 0);
        assert_eq!(
            offsets.take_positions(),
            [(p(0), 1)],
            "what was acknowledged still counts"
        );
        // Read again from 1: acknowledging them moves the position on.
        for offset in 1..5 {
            offsets.start(&p(0), offset);
        }
        for offset in 1..5 {
            offsets.done(&p(0), offset);
        }
        assert_eq!(offsets.take_positions(), [(p(0), 5)]);
    }
}
