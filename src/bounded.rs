//! Running many futures with at most `limit` of them at once, in the caller's task: the probing
//! round of the cleanup task and [`warm_up`](crate::ConnectionPool::warm_up) both need it.
//!
//! In the caller's task rather than spawned: dropping the caller drops every future it runs (so
//! nothing outlives a cancelled call or a stopped cleanup task), nothing needs to be `'static`,
//! and the crate needs no `futures` dependency. The futures are started in the items' order and
//! polled in a fixed order, so a simulation seed replays the same.

use std::future::Future;
use std::pin::Pin;
use std::task::Poll;

/// Runs `start(item)` for every item, at most `limit` (at least 1) at a time, and returns their
/// outputs in the items' order. A future is started only when one of the running ones has ended.
///
/// Each wake polls the running futures (at most `limit` of them), so keep `limit` in the tens.
pub(crate) async fn run_bounded<T, F, Fut>(
    items: Vec<T>,
    limit: usize,
    mut start: F,
) -> Vec<Fut::Output>
where
    F: FnMut(T) -> Fut,
    Fut: Future,
{
    let limit = limit.max(1);
    let total = items.len();
    let mut queue = items.into_iter().enumerate();
    let mut running: Vec<(usize, Pin<Box<Fut>>)> = Vec::with_capacity(limit.min(total));
    let mut outputs: Vec<Option<Fut::Output>> =
        std::iter::repeat_with(|| None).take(total).collect();
    std::future::poll_fn(|cx| {
        loop {
            while running.len() < limit {
                let Some((i, item)) = queue.next() else { break };
                running.push((i, Box::pin(start(item))));
            }
            let mut ended = false;
            let mut j = 0;
            while j < running.len() {
                if let Poll::Ready(output) = running[j].1.as_mut().poll(cx) {
                    let (i, _) = running.swap_remove(j);
                    outputs[i] = Some(output);
                    ended = true;
                } else {
                    j += 1;
                }
            }
            if running.is_empty() && queue.len() == 0 {
                return Poll::Ready(());
            }
            if !ended {
                return Poll::Pending;
            }
            // Some ended: start their successors and poll those at once.
        }
    })
    .await;
    outputs.into_iter().flatten().collect()
}

#[cfg(all(test, not(loom)))]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use super::run_bounded;

    #[tokio::test(start_paused = true)]
    async fn runs_at_most_limit_at_once_and_keeps_the_order() {
        let running = AtomicUsize::new(0);
        let most = AtomicUsize::new(0);
        let out = run_bounded((0..10u64).collect(), 3, |i| {
            let (running, most) = (&running, &most);
            async move {
                let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                most.fetch_max(now, Ordering::SeqCst);
                // Later items end sooner: the order of the outputs is the items', not the ends'.
                tokio::time::sleep(Duration::from_millis(20 - i)).await;
                running.fetch_sub(1, Ordering::SeqCst);
                i * 2
            }
        })
        .await;
        assert_eq!(out, (0..10).map(|i| i * 2).collect::<Vec<_>>());
        assert_eq!(
            most.load(Ordering::SeqCst),
            3,
            "the bound is reached and never passed"
        );
    }

    #[tokio::test]
    async fn no_items_and_a_zero_limit_are_fine() {
        let out: Vec<u8> = run_bounded(Vec::<u8>::new(), 0, |x| async move { x }).await;
        assert!(out.is_empty());
        let out = run_bounded(vec![1, 2], 0, |x| async move { x }).await;
        assert_eq!(out, [1, 2], "a zero limit runs one at a time");
    }
}
