//! The log of a call guard dropped unfinished (the silent case of issue 14): `warn` once per
//! connection, `debug` after, and `debug` only for a call its caller dropped.
//!
//! Alone in its test binary on purpose: tracing caches each log site's interest globally, and a
//! site first reached on another test's thread (no subscriber there) while this test installs its
//! own can cache "never", losing this test's events (seen under load: 0 warnings counted instead of
//! 2). With no other test in the process, nothing races the subscriber. Its own runtime: tokio's
//! builder, which madsim does not have.
#![cfg(not(madsim))]

mod common;

use std::future::IntoFuture;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::{MS, addr};
use keyed_pool::ConnectionPool;

#[derive(Debug, thiserror::Error)]
#[error("an application error")]
struct AppError;

/// A subscriber that counts the events of each level whose message mentions a call.
mod log {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tracing::field::{Field, Visit};
    use tracing::span::{Attributes, Id, Record};
    use tracing::{Event, Level, Metadata, Subscriber};

    #[derive(Default)]
    pub struct Counts {
        pub warn: AtomicUsize,
        pub debug: AtomicUsize,
    }

    pub struct Counter(pub Arc<Counts>);

    struct Message(bool);

    impl Visit for Message {
        fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
            if field.name() == "message" {
                let text = format!("{value:?}");
                self.0 |= text.contains("call guard") || text.contains("call cancelled");
            }
        }
    }

    impl Subscriber for Counter {
        fn enabled(&self, _: &Metadata<'_>) -> bool {
            true
        }
        fn new_span(&self, _: &Attributes<'_>) -> Id {
            Id::from_u64(1)
        }
        fn record(&self, _: &Id, _: &Record<'_>) {}
        fn record_follows_from(&self, _: &Id, _: &Id) {}
        fn event(&self, event: &Event<'_>) {
            let mut about_a_call = Message(false);
            event.record(&mut about_a_call);
            if !about_a_call.0 {
                return;
            }
            match *event.metadata().level() {
                Level::WARN => self.0.warn.fetch_add(1, Ordering::SeqCst),
                Level::DEBUG => self.0.debug.fetch_add(1, Ordering::SeqCst),
                _ => 0,
            };
        }
        fn enter(&self, _: &Id) {}
        fn exit(&self, _: &Id) {}
    }
}

#[test]
fn an_unfinished_guard_is_logged_at_warn_once_per_connection_and_at_debug_after() {
    let counts = Arc::new(log::Counts::default());
    let subscriber = log::Counter(Arc::clone(&counts));
    tracing::subscriber::with_default(subscriber, || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
        runtime.block_on(async {
            let pool: ConnectionPool<u32> = ConnectionPool::new(0, Duration::ZERO);
            let first = pool.try_insert(addr(0), 1).unwrap();
            let second = pool.try_insert(addr(1), 2).unwrap();
            for _ in 0..3 {
                drop(first.begin());
            }
            drop(second.begin());
            assert_eq!(first.metrics().cancelled_count(), 3);
            assert_eq!(
                counts.warn.load(Ordering::SeqCst),
                2,
                "one warning per connection"
            );
            assert_eq!(counts.debug.load(Ordering::SeqCst), 2, "the rest at debug");

            // A call the caller drops is a choice, not a mistake: debug only.
            let call = first.call(|_| std::future::pending::<Result<(), AppError>>());
            assert!(tokio::time::timeout(MS, call.into_future()).await.is_err());
            let fresh = pool.try_insert(addr(2), 3).unwrap();
            let call = fresh.call(|_| std::future::pending::<Result<(), AppError>>());
            assert!(tokio::time::timeout(MS, call.into_future()).await.is_err());
            assert_eq!(
                counts.warn.load(Ordering::SeqCst),
                2,
                "a dropped call is not warned about"
            );
            assert_eq!(counts.debug.load(Ordering::SeqCst), 4);
            // Finished guards log nothing.
            first.begin().success();
            first.begin().failure();
            assert_eq!(counts.debug.load(Ordering::SeqCst), 4);
        });
    });
}
