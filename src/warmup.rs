//! [`ConnectionPool::warm_up`]: connecting to a set of addresses ahead of traffic.

use std::collections::HashSet;
use std::fmt;

use cheetah_string::CheetahString;

use crate::ConnectionPool;
use crate::connection::PooledConnection;
use crate::connector::Connector;
use crate::error::PoolError;

/// What [`ConnectionPool::warm_up`] did for each address: one entry per distinct address, in the
/// order the addresses were first given.
pub struct WarmUpReport<C> {
    results: Vec<(CheetahString, Result<PooledConnection<C>, PoolError>)>,
}

impl<C> WarmUpReport<C> {
    /// Every address with its result, in the order given.
    pub fn results(&self) -> &[(CheetahString, Result<PooledConnection<C>, PoolError>)] {
        &self.results
    }

    /// The results, by value.
    pub fn into_results(self) -> Vec<(CheetahString, Result<PooledConnection<C>, PoolError>)> {
        self.results
    }

    /// How many addresses have a connection.
    pub fn connected(&self) -> usize {
        self.results.iter().filter(|(_, r)| r.is_ok()).count()
    }

    /// The addresses that have none, with why.
    pub fn failures(&self) -> impl Iterator<Item = (&CheetahString, &PoolError)> {
        self.results
            .iter()
            .filter_map(|(addr, r)| r.as_ref().err().map(|err| (addr, err)))
    }

    /// `true` when every address has a connection.
    pub fn is_complete(&self) -> bool {
        self.results.iter().all(|(_, r)| r.is_ok())
    }
}

impl<C> fmt::Debug for WarmUpReport<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(
                self.results
                    .iter()
                    .map(|(addr, r)| (addr, r.as_ref().map(|c| c.id()))),
            )
            .finish()
    }
}

impl<C, K> ConnectionPool<C, K>
where
    C: Send + Sync + 'static,
    K: Connector<Conn = C>,
{
    /// Connects to `addrs` ahead of traffic, at most `concurrency` connects at once (`0` counts
    /// as 1), and says for each distinct address whether it has a connection now.
    ///
    /// Each address goes through [`get_or_connect`](Self::get_or_connect), so everything it
    /// keeps holds here: an address already pooled is not dialled again, an address given twice
    /// is connected once, capacity is respected (beyond it the report says
    /// [`PoolError::AtCapacity`]; under
    /// [`WhenFull::EvictLeastRecentlyUsed`](crate::WhenFull::EvictLeastRecentlyUsed) a later
    /// address may evict an earlier one, so give no more addresses than the pool keeps), a backing
    /// off address is not dialled ([`PoolError::Backoff`]), and after [`close`](Self::close) every
    /// address gets [`PoolError::Closed`]. It never fails as a whole: one address refusing does
    /// not stop the others.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// use keyed_pool::{ConnectionPool, Connector};
    ///
    /// struct Refuses9; // a connector that refuses port 9 and connects everywhere else
    /// impl Connector for Refuses9 {
    ///     type Conn = String;
    ///     type Error = std::io::Error;
    ///     async fn connect(&self, addr: &str) -> std::io::Result<String> {
    ///         if addr.ends_with(":9") {
    ///             return Err(std::io::ErrorKind::ConnectionRefused.into());
    ///         }
    ///         Ok(format!("client of {addr}"))
    ///     }
    /// }
    ///
    /// let pool = ConnectionPool::builder().connector(Refuses9).build().unwrap();
    /// let report = pool.warm_up(["10.0.0.1:1", "10.0.0.2:1", "10.0.0.1:1", "10.0.0.3:9"], 2).await;
    /// assert_eq!(report.results().len(), 3, "one result per distinct address");
    /// assert_eq!(report.connected(), 2);
    /// let (addr, _why) = report.failures().next().unwrap();
    /// assert_eq!(addr.as_str(), "10.0.0.3:9");
    /// assert_eq!(pool.len(), 2);
    /// # }
    /// ```
    ///
    /// # Cancel safety
    /// Cancel safe, as `get_or_connect` is: dropping the future stops waiting; connects already
    /// started finish in their own tasks and pool their connections (or give their slots back).
    pub async fn warm_up<I>(&self, addrs: I, concurrency: usize) -> WarmUpReport<C>
    where
        I: IntoIterator,
        I::Item: AsRef<str>,
    {
        let mut seen = HashSet::new();
        let distinct: Vec<CheetahString> = addrs
            .into_iter()
            .map(|addr| crate::pool::key(addr.as_ref()))
            .filter(|addr| seen.insert(addr.clone()))
            .collect();
        tracing::debug!(addresses = distinct.len(), concurrency, "warming up");
        let results = crate::bounded::run_bounded(distinct, concurrency, |addr| async move {
            let result = self.get_or_connect(&addr).await;
            (addr, result)
        })
        .await;
        let report = WarmUpReport { results };
        if !report.is_complete() {
            tracing::info!(
                connected = report.connected(),
                failed = report.results.len() - report.connected(),
                "warm-up incomplete"
            );
        }
        report
    }
}
