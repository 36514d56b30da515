//! Integration tests against a real PostgreSQL (see `support`): one binary, one cluster.

mod support;

/// Sync logs as tables in the destination (--audit-schema).
mod audit;
/// The built binary: flags, config files, exit codes, JSON output.
mod cli;
/// Change-aware reads: only rows written since the last run, every case that could hide one.
mod delta;
/// Errors a user can meet before or during a run, each with its message.
mod errors;
/// Connection settings from libpq's password file, service file and PG* environment.
mod libpq_env;
/// Random operation sequences on the source, a sync after each, destination == source.
mod model_prop;
/// Parallel reads: ctid ranges on several sessions under one exported snapshot.
mod parallel;
/// The snapshot rebuilt from the target: lost state files, adopted targets, --rebuild-state.
mod rebuild;
/// Real faults: statement timeouts, bad rows, killed sessions, restarts, signals.
mod resilience;
/// SSH tunnels to both databases, against a real sshd: host keys, client keys, the agent.
mod ssh;
/// A hot standby source: recovery conflicts retried.
mod standby;
/// Table and query models, no-change runs, churn, deletes, insert mode, mapping, dry runs.
mod sync_basic;
/// TLS with libpq's sslmode semantics, against a server with a test CA.
mod tls;
/// Every standard column type round-trips byte-exactly; keys of several types.
mod types;
/// pgdelta verify: drift found, the snapshot checked against the target, --repair.
mod verify;
