//! Reading history pages from the region's stream: an ephemeral pull
//! consumer filtered to the patterns asked for, or direct gets when no
//! consumer can be created.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{consumer, stream};
use futures_util::StreamExt;
use switchboard_config::Pattern;

use super::{NatsBroker, REQUEST_TIMEOUT, unavailable};
use crate::broker::{BrokerError, Filter, Latest, ReadBatch};
use crate::event::Cursor;

/// Read stored events after `after` (up to `until`), optionally for one tenant.
pub(super) async fn read_range(
    broker: &NatsBroker,
    tenant: Option<&str>,
    scope: &[Pattern],
    after: Cursor,
    filter: Filter<'_>,
    limit: usize,
    until: u64,
) -> Result<ReadBatch, BrokerError> {
    let mut out = ReadBatch::at(after);
    if after.seq >= until {
        return Ok(out);
    }
    let stream = broker.stream().await?;
    let filter_subject = match tenant {
        Some(t) => broker.subjects.tenant_history(t),
        None => broker.subjects.all_events(),
    };
    let created = create_reader(
        broker,
        &stream,
        tenant,
        scope,
        &filter_subject,
        consumer::DeliverPolicy::ByStartSequence {
            start_sequence: after.seq + 1,
        },
    )
    .await;
    let mut consumer = match created {
        Ok(Ok(c)) => c,
        // Creating a consumer needs the JetStream meta leader, which may be
        // on the far side of a partition; the stream's own replicas still
        // answer direct gets.
        failed => {
            let reason = match failed {
                Ok(Err(e)) => e.to_string(),
                _ => "timed out".into(),
            };
            tracing::debug!(reason, "reading history with direct gets");
            return read_direct(broker, &stream, &filter_subject, out, filter, limit, until).await;
        }
    };
    let pending = consumer.cached_info().num_pending;
    let result = if pending == 0 {
        Ok(())
    } else {
        fetch_range(broker, &mut consumer, after, &mut out, filter, limit, until).await
    };
    let name = consumer.cached_info().name.clone();
    tokio::spawn(async move {
        let _ = tokio::time::timeout(REQUEST_TIMEOUT, stream.delete_consumer(&name)).await;
    });
    result.map(|()| out)
}

/// An ephemeral pull consumer in memory, without acks, deleted after the
/// read: three requests (create, fetch, delete) however long the range, and
/// nothing left behind when a reconnect storm runs thousands. It reads only
/// the subjects of the patterns asked for when NATS can take them as
/// consumer filters (no two may overlap): a resuming client then reads its
/// own topics, not its whole tenant's history.
async fn create_reader(
    broker: &NatsBroker,
    stream: &stream::Stream<()>,
    tenant: Option<&str>,
    scope: &[Pattern],
    filter_subject: &str,
    deliver_policy: consumer::DeliverPolicy,
) -> Result<
    Result<
        consumer::Consumer<consumer::pull::Config>,
        async_nats::jetstream::stream::ConsumerError,
    >,
    tokio::time::error::Elapsed,
> {
    let scoped: Vec<String> = match tenant {
        Some(t) if disjoint(scope) => scope
            .iter()
            .map(|p| broker.subjects.pattern_history(t, p))
            .collect(),
        _ => Vec::new(),
    };
    let (single, several) = match scoped.len() {
        0 => (filter_subject.to_owned(), Vec::new()),
        1 => (scoped[0].clone(), Vec::new()),
        _ => (String::new(), scoped),
    };
    tokio::time::timeout(
        REQUEST_TIMEOUT,
        stream.create_consumer(consumer::pull::Config {
            filter_subject: single,
            filter_subjects: several,
            deliver_policy,
            ack_policy: consumer::AckPolicy::None,
            memory_storage: true,
            num_replicas: 1,
            inactive_threshold: Duration::from_secs(30),
            ..Default::default()
        }),
    )
    .await
}

/// The newest stored event of each of `tenant`'s subjects that `scope`
/// names (a consumer delivering the last message per subject), kept by
/// `filter`, then one per topic (a topic has one subject per origin region).
pub(super) async fn read_latest(
    broker: &NatsBroker,
    tenant: &str,
    scope: &[Pattern],
    filter: Filter<'_>,
    limit: usize,
    until: u64,
) -> Result<Latest, BrokerError> {
    let stream = broker.stream().await?;
    let filter_subject = broker.subjects.tenant_history(tenant);
    let mut consumer = match create_reader(
        broker,
        &stream,
        Some(tenant),
        scope,
        &filter_subject,
        consumer::DeliverPolicy::LastPerSubject,
    )
    .await
    {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => return Err(unavailable(e)),
        Err(e) => return Err(unavailable(e)),
    };
    let mut out = ReadBatch::at(Cursor { epoch: 0, seq: 0 });
    // Read every subject's last message (bounded): `limit` applies to
    // topics after merging regions, not to subjects.
    let result = if consumer.cached_info().num_pending == 0 {
        Ok(())
    } else {
        fetch_range(
            broker,
            &mut consumer,
            out.next,
            &mut out,
            filter,
            MAX_SNAPSHOT_SUBJECTS,
            until,
        )
        .await
    };
    let name = consumer.cached_info().name.clone();
    tokio::spawn(async move {
        let _ = tokio::time::timeout(REQUEST_TIMEOUT, stream.delete_consumer(&name)).await;
    });
    result?;
    let mut latest = crate::broker::newest_per_topic(out.events, limit);
    latest.more |= out.more;
    Ok(latest)
}

/// Most subjects one snapshot reads.
const MAX_SNAPSHOT_SUBJECTS: usize = 10_000;

/// Pull the consumer's messages (in no-wait batches) into `out` until the
/// range, the limit or the pending messages end.
async fn fetch_range(
    broker: &NatsBroker,
    consumer: &mut consumer::Consumer<consumer::pull::Config>,
    after: Cursor,
    out: &mut ReadBatch,
    filter: Filter<'_>,
    limit: usize,
    until: u64,
) -> Result<(), BrokerError> {
    const BATCH: usize = 256;
    let deadline = tokio::time::Instant::now() + REQUEST_TIMEOUT;
    let mut refused = 0;
    'pull: loop {
        let mut messages =
            tokio::time::timeout_at(deadline, consumer.fetch().max_messages(BATCH).messages())
                .await
                .map_err(unavailable)?
                .map_err(unavailable)?;
        let mut got = 0;
        loop {
            let next = tokio::time::timeout_at(deadline, messages.next()).await;
            let msg = match next {
                Ok(Some(Ok(m))) => m,
                Ok(Some(Err(e))) => match pull_again_after(got, &mut refused) {
                    Some(wait) => {
                        tracing::debug!(attempt = refused, error = %e, "pull refused; pulling again");
                        tokio::time::sleep(wait).await;
                        continue 'pull;
                    }
                    None => return Err(unavailable(e)),
                },
                Ok(None) => break,
                // Slow (an overloaded server): hand over what arrived and
                // let the caller continue from there; nothing at all is an
                // error, never a silently short history.
                Err(_) if out.next.seq > after.seq => {
                    out.more = true;
                    return Ok(());
                }
                Err(_) => return Err(unavailable("history read timed out")),
            };
            got += 1;
            let Ok(info) = msg.info() else { continue };
            let (seq, pending, published) = (info.stream_sequence, info.pending, info.published);
            if seq > until {
                return Ok(());
            }
            out.next.seq = seq;
            if let Some(event) = broker.seal(
                &msg.subject,
                seq,
                published,
                &msg.payload,
                msg.headers.as_ref(),
            ) && filter(&event)
            {
                out.events.push(Arc::new(event));
            }
            if pending == 0 || seq >= until {
                return Ok(());
            }
            if out.events.len() >= limit {
                out.more = true;
                return Ok(());
            }
        }
        if got == 0 {
            // Nothing more to fetch: the filtered range is exhausted.
            return Ok(());
        }
    }
}

/// Pulls refused before any message arrived that are tried again (about a
/// second of waiting in all).
const PULL_RETRIES: u32 = 6;

/// Whether a failed pull of a consumer just created is tried again, and
/// after how long. Until the consumer's interest has spread to the server
/// this gateway talks to (across the link between clusters when the stream
/// is another region's, or between the nodes of a cluster), its pull is
/// answered "no responders" (503). A pull that delivered nothing (`got`
/// is 0) can be repeated without losing or repeating anything.
pub(super) fn pull_again_after(got: usize, refused: &mut u32) -> Option<Duration> {
    (got == 0 && *refused < PULL_RETRIES).then(|| {
        *refused += 1;
        Duration::from_millis(50 * u64::from(*refused))
    })
}

/// Patterns NATS accepts together as consumer filters: one pattern, or a
/// few distinct exact topics (which cannot overlap).
pub(super) fn disjoint(scope: &[Pattern]) -> bool {
    const MAX_FILTERS: usize = 16;
    match scope {
        [] => false,
        [_] => true,
        _ => {
            scope.len() <= MAX_FILTERS
                && scope.iter().all(Pattern::is_exact)
                && scope
                    .iter()
                    .enumerate()
                    .all(|(i, p)| scope[..i].iter().all(|q| q != p))
        }
    }
}

/// History read one message at a time with direct gets (no consumer).
async fn read_direct(
    broker: &NatsBroker,
    stream: &stream::Stream<()>,
    subject: &str,
    mut out: ReadBatch,
    filter: Filter<'_>,
    limit: usize,
    until: u64,
) -> Result<ReadBatch, BrokerError> {
    let mut seq = out.next.seq + 1;
    while seq <= until {
        let got = tokio::time::timeout(
            REQUEST_TIMEOUT,
            stream.direct_get_next_for_subject(subject, Some(seq)),
        )
        .await
        .map_err(unavailable)?;
        let msg = match got {
            Ok(m) => m,
            Err(e) if e.kind() == stream::DirectGetErrorKind::NotFound => break,
            Err(e) => return Err(unavailable(e)),
        };
        if msg.sequence > until {
            break;
        }
        out.next.seq = msg.sequence;
        seq = msg.sequence + 1;
        if let Some(event) = broker.seal(
            &msg.subject,
            msg.sequence,
            msg.time,
            &msg.payload,
            Some(&msg.headers),
        ) && filter(&event)
        {
            out.events.push(Arc::new(event));
            if out.events.len() >= limit {
                out.more = msg.sequence < until;
                break;
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn patterns(p: &[&str]) -> Vec<Pattern> {
        p.iter().map(|s| Pattern::parse(s).unwrap()).collect()
    }

    #[test]
    fn a_refused_pull_is_repeated_only_when_it_delivered_nothing_and_a_bounded_number_of_times() {
        let mut refused = 0;
        let waits: Vec<Duration> =
            std::iter::from_fn(|| pull_again_after(0, &mut refused)).collect();
        assert_eq!(waits.len(), PULL_RETRIES as usize);
        assert!(waits.windows(2).all(|w| w[0] < w[1]), "{waits:?}");
        assert!(waits.iter().sum::<Duration>() <= Duration::from_millis(1100));
        let mut refused = 0;
        assert_eq!(
            pull_again_after(1, &mut refused),
            None,
            "a pull that delivered messages"
        );
    }

    #[test]
    fn only_patterns_that_cannot_overlap_become_consumer_filters() {
        assert!(!disjoint(&[]), "no scope: read the tenant");
        assert!(disjoint(&patterns(&["deal.*"])), "one pattern");
        assert!(disjoint(&patterns(&["deal.won", "deal.lost"])));
        assert!(
            !disjoint(&patterns(&["deal.*", "deal.won"])),
            "a wildcard may overlap another filter"
        );
        assert!(!disjoint(&patterns(&["deal.won", "deal.won"])), "a repeat");
        let many: Vec<String> = (0..17).map(|i| format!("t.e{i}")).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        assert!(!disjoint(&patterns(&many)), "more filters than NATS takes");
        assert!(disjoint(&patterns(&many[..16])));
    }
}
