//! Async client of the lohar wire protocol, used by the daemon and the bench.
