//! Resuming a cursor issued in another region.
//!
//! A cursor is a position in its region's stream. Every region's stream
//! holds the same events (its own and those it sources), each in its own
//! interleaving, but the events of one origin region always in that
//! origin's order: sourcing copies a stream in sequence order. So a
//! client that saw region Q's stream up to position `s` has seen, of each
//! origin region O, exactly the events up to some origin sequence `V_O`
//! (a prefix), and nothing after. Translating the cursor means finding
//! that vector in Q's stream, then, in this region's stream, the first
//! event of each origin past its `V_O`: reading starts at the earliest of
//! those and skips, up to the latest, the events the client already saw.
//!
//! Identity of an event across regions: its origin region (the subject's
//! origin token) and its sequence in the origin's stream (its own
//! sequence there; `Nats-Stream-Source` on a sourced copy).
//!
//! Every step is a direct get (galloping back from the cursor or the head,
//! then bisecting), so a translation costs tens of requests whatever the
//! stream's length. It needs Q's stream to be reachable: with the whole
//! region Q gone (its NATS too), the cursor is answered with `resume.gap`
//! (`unknown`) as before.

use std::time::Duration;

use async_nats::HeaderMap;
use std::future::Future;

use async_nats::jetstream::message::StreamMessage;
use async_nats::jetstream::stream;

use super::region_stream::epoch_of;
use super::subject::escape_tenant;
use super::{NatsBroker, REQUEST_TIMEOUT, unavailable};
use crate::broker::{BrokerError, SeenElsewhere};
use crate::event::Cursor;

/// What a cursor from another region means here.
#[derive(Debug)]
pub(super) enum Translation {
    /// Resume with this plan.
    Mapped(Plan),
    /// The cursor is older than the retention of its own region's stream.
    Expired,
    /// No reachable region's stream has the cursor's epoch (or position).
    Unknown,
}

/// Where to read this region's stream for a translated cursor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Plan {
    /// Read after this position: the earliest event the client may not
    /// have seen.
    pub after: u64,
    /// This region's stream head when the plan was made.
    pub until: u64,
    /// What the client saw, skipped from there on.
    pub seen: SeenElsewhere,
}

/// The origin sequence JetStream records on a sourced copy:
/// `Nats-Stream-Source: <stream>[:<domain hash>] <sequence> <filter> <dest>`.
pub(super) fn sourced_sequence(headers: &HeaderMap) -> Option<u64> {
    let value = headers.get("Nats-Stream-Source")?.as_str();
    value.split_ascii_whitespace().nth(1)?.parse().ok()
}

/// How long a translation waits for this region to catch up with events
/// the client already saw in the other region (sourcing lag).
const CATCH_UP: Duration = Duration::from_secs(2);

impl NatsBroker {
    /// Translate `cursor` (not of this region's epoch) for `tenant`.
    pub(super) async fn translate(
        &self,
        tenant: &str,
        cursor: Cursor,
    ) -> Result<Translation, BrokerError> {
        let Some((from_region, theirs)) = self.stream_of_epoch(cursor.epoch).await else {
            return Ok(Translation::Unknown);
        };
        let their_state = &theirs.cached_info().state;
        if cursor.seq > their_state.last_sequence {
            return Ok(Translation::Unknown);
        }
        if cursor.seq.saturating_add(1) < their_state.first_sequence {
            return Ok(Translation::Expired);
        }
        // The vector in the cursor's region.
        let mut seen: Vec<(String, u64)> = vec![(from_region.clone(), cursor.seq)];
        for origin in self.regions.iter().filter(|r| **r != from_region) {
            let subject = self.origin_subject(origin, tenant);
            let next = |p| probe(&theirs, &subject, p);
            let v = match last_at_or_before(next, cursor.seq, their_state.first_sequence).await? {
                Some((_, origin_seq)) => origin_seq,
                // None of that origin's events at or before the cursor: the
                // client saw those before the first one after it (older
                // ones were purged there), or none at all.
                None => match probe(&theirs, &subject, cursor.seq + 1).await? {
                    Some((_, origin_seq)) => origin_seq.map(|s| s.saturating_sub(1)),
                    None => Some(0),
                },
            };
            let Some(v) = v else {
                tracing::debug!(origin, "a sourced event without its origin sequence");
                return Ok(Translation::Unknown);
            };
            seen.push((origin.clone(), v));
        }
        let ours = self.stream().await?;
        self.wait_for_sources(&ours, tenant, &seen).await;
        let here = self.stream_state().await?;
        let here_region = self.subjects.region();
        // Per origin, the first position here past what the client saw.
        let mut firsts = Vec::with_capacity(seen.len());
        for (origin, v) in &seen {
            let first = if origin == here_region {
                // Our own events: origin sequence is the position.
                Some(v + 1)
            } else {
                let subject = self.origin_subject(origin, tenant);
                let next = |p| probe(&ours, &subject, p);
                first_past(next, *v, here.first_sequence, here.last_sequence).await?
            };
            firsts.push(first.unwrap_or(u64::MAX));
        }
        let start = firsts.iter().copied().min().unwrap_or(u64::MAX);
        let plan = Plan {
            after: start.min(here.last_sequence + 1).saturating_sub(1),
            until: here.last_sequence,
            seen: SeenElsewhere {
                per_origin: seen.into_iter().map(|(r, s)| (r.into(), s)).collect(),
            },
        };
        tracing::debug!(?plan, %cursor, from_region, "cursor from another region translated");
        Ok(Translation::Mapped(plan))
    }

    /// `tenant`'s events published in `origin` (not resident ones: those
    /// never leave their region).
    fn origin_subject(&self, origin: &str, tenant: &str) -> String {
        format!(
            "{}.ev.{origin}.{}.>",
            self.subjects.prefix(),
            escape_tenant(tenant)
        )
    }

    /// The other region whose stream has `epoch`, with that stream.
    async fn stream_of_epoch(&self, epoch: u64) -> Option<(String, stream::Stream)> {
        if epoch == 0 {
            return None;
        }
        for region in self
            .regions
            .iter()
            .filter(|r| r.as_str() != self.subjects.region())
        {
            let got = tokio::time::timeout(
                REQUEST_TIMEOUT,
                self.js.get_stream(self.subjects.stream_name(region)),
            )
            .await;
            match got {
                Ok(Ok(s)) if epoch_of(s.cached_info().created) == epoch => {
                    return Some((region.clone(), s));
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => tracing::debug!(region, error = %e, "region stream not readable"),
                Err(_) => tracing::debug!(region, "region stream not readable: timed out"),
            }
        }
        None
    }

    /// Wait (briefly) until this region's stream holds every event the
    /// client saw from each other origin: sourcing runs a little behind.
    async fn wait_for_sources(
        &self,
        ours: &stream::Stream<()>,
        tenant: &str,
        seen: &[(String, u64)],
    ) {
        let deadline = tokio::time::Instant::now() + CATCH_UP;
        for (origin, v) in seen {
            if origin == self.subjects.region() || *v == 0 {
                continue;
            }
            let subject = self.origin_subject(origin, tenant);
            loop {
                let got = tokio::time::timeout(
                    REQUEST_TIMEOUT,
                    ours.direct_get_last_for_subject(subject.as_str()),
                )
                .await;
                let newest = match got {
                    Ok(Ok(m)) => sourced_sequence(&m.headers).unwrap_or(0),
                    _ => 0,
                };
                if newest >= *v {
                    break;
                }
                if tokio::time::Instant::now() >= deadline {
                    tracing::info!(
                        origin,
                        have = newest,
                        saw = v,
                        "resuming before this region sourced everything the client saw"
                    );
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// The first message on `subject` at or after `from`.
async fn next_for<I>(
    stream: &stream::Stream<I>,
    subject: &str,
    from: u64,
) -> Result<Option<StreamMessage>, BrokerError> {
    let got = tokio::time::timeout(
        REQUEST_TIMEOUT,
        stream.direct_get_next_for_subject(subject, Some(from.max(1))),
    )
    .await
    .map_err(unavailable)?;
    match got {
        Ok(m) => Ok(Some(m)),
        Err(e) if e.kind() == stream::DirectGetErrorKind::NotFound => Ok(None),
        Err(e) => Err(unavailable(e)),
    }
}

/// What a search learns from one probe: the first message of the searched
/// subject at or after a position, as (position, origin sequence).
type Probe = Option<(u64, Option<u64>)>;

/// Probe `subject` in `stream` (the searches' one request).
async fn probe<I>(
    stream: &stream::Stream<I>,
    subject: &str,
    from: u64,
) -> Result<Probe, BrokerError> {
    Ok(next_for(stream, subject, from)
        .await?
        .map(|m| (m.sequence, sourced_sequence(&m.headers))))
}

/// The last message at or before `hi` (not before `lo`), as `next` (the
/// first message at or after a position) shows them: gallop back from
/// `hi`, then bisect.
async fn last_at_or_before<F, Fut>(
    mut next: F,
    hi: u64,
    lo: u64,
) -> Result<Option<(u64, Option<u64>)>, BrokerError>
where
    F: FnMut(u64) -> Fut,
    Fut: Future<Output = Result<Probe, BrokerError>>,
{
    let lo = lo.max(1);
    if hi < lo {
        return Ok(None);
    }
    // Any message in range, nearest `hi` first.
    let mut step = 1u64;
    let mut found = None;
    loop {
        let from = hi.saturating_sub(step - 1).max(lo);
        if let Some(m) = next(from).await?
            && m.0 <= hi
        {
            found = Some(m);
            break;
        }
        if from == lo {
            break;
        }
        step = step.saturating_mul(2);
    }
    let Some(mut best) = found else {
        return Ok(None);
    };
    // `best` is in range; a later one in (best, hi]?
    let (mut a, mut b) = (best.0 + 1, hi);
    while a <= b {
        let mid = a + (b - a) / 2;
        match next(mid).await? {
            Some(m) if m.0 <= hi => {
                a = m.0 + 1;
                best = m;
            }
            _ => b = mid - 1,
        }
    }
    Ok(Some(best))
}

/// The position of the first message (of one origin, in origin order)
/// whose origin sequence is past `seen`, between `lo` and `hi`, searching
/// back from `hi`.
async fn first_past<F, Fut>(
    mut next: F,
    seen: u64,
    lo: u64,
    hi: u64,
) -> Result<Option<u64>, BrokerError>
where
    F: FnMut(u64) -> Fut,
    Fut: Future<Output = Result<Probe, BrokerError>>,
{
    let lo = lo.max(1);
    if hi < lo {
        return Ok(None);
    }
    // past(p): the first message at or after p is past `seen` (or there
    // is none). Monotone in p: false, then true.
    let past = |m: &Probe| match m {
        Some((_, origin)) => origin.is_none_or(|s| s > seen),
        None => true,
    };
    let mut step = 1u64;
    let mut a = lo;
    let mut b = hi + 1; // past(hi + 1) holds for what is stored up to hi
    loop {
        let p = hi.saturating_sub(step - 1).max(lo);
        if !past(&next(p).await?) {
            a = p + 1;
            break;
        }
        b = p;
        if p == lo {
            break;
        }
        step = step.saturating_mul(2);
    }
    // The smallest p in [a, b] with past(p); past(b) holds.
    while a < b {
        let mid = a + (b - a) / 2;
        if past(&next(mid).await?) {
            b = mid;
        } else {
            a = mid + 1;
        }
    }
    if b > hi {
        return Ok(None);
    }
    Ok(next(b).await?.map(|m| m.0).filter(|p| *p <= hi))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source_header(value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("Nats-Stream-Source", value);
        h
    }

    #[test]
    fn the_origin_sequence_comes_from_the_source_header() {
        assert_eq!(
            sourced_sequence(&source_header("SB_us 42 sb.ev.us.> >")),
            Some(42)
        );
        assert_eq!(
            sourced_sequence(&source_header("SB_us:ab12 7 > >")),
            Some(7)
        );
        assert_eq!(sourced_sequence(&source_header("SB_us")), None);
        assert_eq!(sourced_sequence(&source_header("SB_us x > >")), None);
        assert_eq!(sourced_sequence(&HeaderMap::new()), None);
    }

    /// A stream of one origin's messages: (position, origin sequence), both
    /// increasing, from which `next` answers like a direct get.
    fn model(positions: &std::collections::BTreeSet<u64>) -> Vec<(u64, Option<u64>)> {
        positions
            .iter()
            .enumerate()
            .map(|(i, p)| (*p, Some(10 + 3 * i as u64)))
            .collect()
    }

    fn run<T>(f: impl Future<Output = T>) -> T {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime")
            .block_on(f)
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig {
            cases: 400, rng_seed: proptest::test_runner::RngSeed::Fixed(7), ..Default::default()
        })]

        #[test]
        fn searches_agree_with_a_scan(
            positions in proptest::collection::btree_set(1u64..300, 0..40),
            lo in 1u64..300,
            hi in 1u64..320,
            seen in 0u64..140,
        ) {
            let msgs = model(&positions);
            let probes = std::cell::Cell::new(0u32);
            let next = |from: u64| {
                probes.set(probes.get() + 1);
                let found = msgs.iter().copied().find(|(p, _)| *p >= from);
                async move { Ok::<_, BrokerError>(found) }
            };
            // The last message in [lo, hi].
            let scanned = msgs.iter().copied().rfind(|(p, _)| *p >= lo && *p <= hi);
            let searched = run(last_at_or_before(next, hi, lo)).expect("model");
            proptest::prop_assert_eq!(searched, scanned);
            // The first message in [lo, hi] past `seen`.
            let scanned = msgs
                .iter()
                .find(|(p, o)| *p >= lo && *p <= hi && o.is_some_and(|o| o > seen))
                .map(|(p, _)| *p);
            let searched = run(first_past(next, seen, lo, hi)).expect("model");
            proptest::prop_assert_eq!(searched, scanned);
            // Logarithmic: a few dozen probes for a few hundred positions.
            proptest::prop_assert!(probes.get() <= 40, "{} probes", probes.get());
        }
    }
}
