//! Tooling around the engine, kept apart from the sync path (which depends on none of it):
//!
//! - [`pgserver`]: a throwaway local PostgreSQL (initdb + pg_ctl as an unprivileged user) for
//!   `demo`, `bench` and the tests.
//! - [`workload`]: the `orders` table, seeding and churn, and the plain COPY read baseline.
//! - [`demo`]: `pgdelta demo`, the main job on an embedded default.
//! - [`bench`]: `pgdelta bench`, end-to-end benchmarks against same-run baselines;
//!   [`report`] draws its HTML page.

pub mod bench;
pub mod demo;
pub mod pgserver;
mod report;
pub mod workload;
