//! The `addresses` fuzz target: arbitrary strings as addresses.
//!
//! `keyed_pool::tcp::validate_addr` must never panic and must agree with its documented rule
//! (`host:port` or `[v6]:port`, non-empty host without whitespace or control characters, port in
//! `1..=65535`); and `get_or_connect` through a connector that validates with it must refuse a
//! malformed address with `InvalidAddress` before any connect, and try a well-formed one.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};

use keyed_pool::tcp::{TcpConnection, TcpConnector, validate_addr};
use keyed_pool::{CheetahString, ConnectionPool, Connector, PoolError};

/// Validates like [`TcpConnector`] but never touches the network: every connect fails at once.
#[derive(Debug, Default)]
pub struct ValidatingConnector {
    connects: AtomicU64,
}

/// The error of [`ValidatingConnector`].
#[derive(Debug, Clone, Copy)]
pub struct Offline;

impl std::fmt::Display for Offline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("offline")
    }
}

impl std::error::Error for Offline {}

impl Connector for ValidatingConnector {
    type Conn = ();
    type Error = Offline;

    async fn connect(&self, _addr: &str) -> Result<(), Offline> {
        self.connects.fetch_add(1, Ordering::SeqCst);
        Err(Offline)
    }

    fn validate(&self, addr: &str) -> Result<(), String> {
        validate_addr(addr)
    }
}

/// The rule of `validate_addr`, restated; `true` when `s` must be accepted.
pub fn well_formed(s: &str) -> bool {
    if let Ok(sa) = s.parse::<SocketAddr>() {
        return sa.port() != 0;
    }
    let Some((host, port)) = s.rsplit_once(':') else {
        return false;
    };
    !host.is_empty()
        && !host.contains(':')
        && !host.starts_with('[')
        && !host.chars().any(|c| c.is_whitespace() || c.is_control())
        && port.parse::<u16>().is_ok_and(|p| p != 0)
}

/// The whole check of one string.
///
/// # Panics
/// When `validate_addr` disagrees with [`well_formed`], or `get_or_connect` handles it wrongly.
pub fn check(s: &str) {
    let verdict = validate_addr(s);
    assert_eq!(
        verdict.is_ok(),
        well_formed(s),
        "validate_addr({s:?}) = {verdict:?} disagrees with the rule"
    );
    if let Err(reason) = &verdict {
        assert!(
            !reason.is_empty(),
            "validate_addr({s:?}) gave an empty reason"
        );
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("runtime");
    rt.block_on(async {
        let key: CheetahString = s.into();
        let pool = ConnectionPool::builder()
            .connector(ValidatingConnector::default())
            .build::<()>()
            .expect("default config is valid");
        let got = pool.get_or_connect(&key).await;
        let connects = pool.connector().connects.load(Ordering::SeqCst);
        if verdict.is_ok() {
            assert!(
                matches!(got, Err(PoolError::Connect { .. })) && connects == 1,
                "get_or_connect({s:?}) of a well-formed address gave {got:?} after {connects} connect(s)"
            );
        } else {
            assert!(
                matches!(&got, Err(PoolError::InvalidAddress { addr, .. }) if addr == &key)
                    && connects == 0,
                "get_or_connect({s:?}) of a malformed address gave {got:?} after {connects} connect(s)"
            );
            // The real TCP connector refuses it the same way, before touching the network.
            let tcp = ConnectionPool::builder()
                .connector(TcpConnector)
                .build::<TcpConnection>()
                .expect("default config is valid");
            let got = tcp.get_or_connect(&key).await;
            assert!(
                matches!(got, Err(PoolError::InvalidAddress { .. })),
                "TcpConnector: get_or_connect({s:?}) gave {got:?}"
            );
        }
    });
}
