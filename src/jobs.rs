//! The order of the syncs of one invocation (`--jobs N`): a sync whose target has a foreign
//! key to another sync's target starts once that parent's writes are done (so its rows find
//! their parents), and the parent's deletes wait until the child has finished (so the child's
//! rows that referenced deleted parents are gone first); `after = ["name"]` waits for a whole
//! sync. Syncs with no order between them run at once, up to N.
//!
//! [`Order`] is the pure part (edges, cycles); [`RunOrder`] is what one run holds.

use std::collections::BTreeMap;
use std::sync::Arc;

use tokio::sync::{watch, Mutex, OwnedSemaphorePermit, Semaphore};

use crate::error::{pg_message, Error};
use crate::spec::SyncSpec;

/// Where a run stands, for the runs that wait on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    Waiting,
    Running,
    /// Written what it writes (inserts and updates); deletes may follow.
    WritesDone,
    /// Ended, successfully or not.
    Finished,
}

/// The order between the syncs of one invocation, by index into its list.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Order {
    /// `parents[i]`: syncs whose targets sync `i`'s target references (start after their writes).
    pub parents: Vec<Vec<usize>>,
    /// `after[i]`: syncs `i` starts after (they must have finished).
    pub after: Vec<Vec<usize>>,
}

impl Order {
    /// The order from the syncs' `after` lists and the foreign keys among their targets
    /// (`(child, parent)` pairs of target names as the specs give them). A cycle is an error
    /// that names it; a name in `after` that is not among the syncs is an error too.
    pub fn new(specs: &[SyncSpec], fks: &[(usize, usize)]) -> Result<Order, Error> {
        let index: BTreeMap<&str, usize> = specs
            .iter()
            .enumerate()
            .map(|(i, s)| (s.name.as_str(), i))
            .collect();
        let mut order = Order {
            parents: vec![Vec::new(); specs.len()],
            after: vec![Vec::new(); specs.len()],
        };
        for (i, s) in specs.iter().enumerate() {
            for name in &s.after {
                let j = *index.get(name.as_str()).ok_or_else(|| {
                    Error::Config(format!(
                        "sync '{}': after = [\"{name}\"] names no sync of this run (syncs: {})",
                        s.name,
                        index.keys().copied().collect::<Vec<_>>().join(", ")
                    ))
                })?;
                order.after[i].push(j);
            }
        }
        for &(child, parent) in fks {
            if child != parent && !order.parents[child].contains(&parent) {
                order.parents[child].push(parent);
            }
        }
        if let Some(cycle) = order.cycle() {
            let names: Vec<&str> = cycle.iter().map(|&i| specs[i].name.as_str()).collect();
            return Err(Error::Config(format!(
                "the syncs wait on each other in a cycle: {} (foreign keys between their targets, or after = [...]); break it with after, or run them in separate invocations",
                names.join(" -> ")
            )));
        }
        Ok(order)
    }

    /// The syncs whose targets reference sync `i`'s target: its deletes wait for them.
    pub fn children(&self, i: usize) -> Vec<usize> {
        (0..self.parents.len())
            .filter(|&c| self.parents[c].contains(&i))
            .collect()
    }

    /// A cycle of "starts after" edges, as a path that returns to its start.
    fn cycle(&self) -> Option<Vec<usize>> {
        let n = self.parents.len();
        // 0 unvisited, 1 on the path, 2 done.
        let mut state = vec![0u8; n];
        let mut path = Vec::new();
        fn visit(
            o: &Order,
            i: usize,
            state: &mut [u8],
            path: &mut Vec<usize>,
        ) -> Option<Vec<usize>> {
            state[i] = 1;
            path.push(i);
            for &j in o.parents[i].iter().chain(&o.after[i]) {
                if state[j] == 1 {
                    let from = path.iter().position(|&p| p == j).expect("on the path");
                    let mut cycle = path[from..].to_vec();
                    cycle.push(j);
                    return Some(cycle);
                }
                if state[j] == 0 {
                    if let Some(c) = visit(o, j, state, path) {
                        return Some(c);
                    }
                }
            }
            path.pop();
            state[i] = 2;
            None
        }
        (0..n).find_map(|i| match state[i] {
            0 => visit(self, i, &mut state, &mut path),
            _ => None,
        })
    }
}

/// Foreign keys among the targets, as `(child, parent)` indexes into `specs`, from the
/// destination's catalog.
pub async fn foreign_keys(
    dst: &tokio_postgres::Client,
    specs: &[SyncSpec],
) -> Result<Vec<(usize, usize)>, Error> {
    let err = |e: tokio_postgres::Error| {
        Error::Server(format!(
            "cannot read the foreign keys between the targets: {}",
            pg_message(&e)
        ))
    };
    let mut oids = Vec::with_capacity(specs.len());
    for s in specs {
        let oid: Option<i64> = dst
            .query_one("SELECT to_regclass($1)::oid::int8", &[&s.target])
            .await
            .map_err(err)?
            .get(0);
        oids.push(oid);
    }
    let rows = dst
        .query(
            "SELECT conrelid::int8, confrelid::int8 FROM pg_constraint WHERE contype = 'f'",
            &[],
        )
        .await
        .map_err(err)?;
    let at =
        |oid: i64| -> Vec<usize> { (0..oids.len()).filter(|&i| oids[i] == Some(oid)).collect() };
    let mut fks = Vec::new();
    for r in rows {
        for child in at(r.get(0)) {
            for parent in at(r.get(1)) {
                fks.push((child, parent));
            }
        }
    }
    Ok(fks)
}

/// One run's place in the order: it reports its phase, and before its deletes it waits for
/// the syncs whose targets reference its own, giving up its slot among the N meanwhile.
#[derive(Debug, Clone)]
pub struct RunOrder {
    pub phase: Arc<watch::Sender<Phase>>,
    pub children: Vec<watch::Receiver<Phase>>,
    pub slots: Arc<Semaphore>,
    pub slot: Arc<Mutex<Option<OwnedSemaphorePermit>>>,
}

impl RunOrder {
    /// The run's inserts and updates are committed: its children may start.
    pub fn writes_done(&self) {
        self.phase.send_replace(Phase::WritesDone);
    }

    /// Returns once the run's deletes may go: every child has finished.
    pub async fn before_deletes(&self) {
        if self.children.is_empty() {
            return;
        }
        // Let a child take this slot, or N = 1 would wait forever.
        drop(self.slot.lock().await.take());
        for c in &self.children {
            let mut c = c.clone();
            let _ = c.wait_for(|p| *p == Phase::Finished).await;
        }
        if let Ok(p) = self.slots.clone().acquire_owned().await {
            *self.slot.lock().await = Some(p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn specs(names: &[(&str, &[&str])]) -> Vec<SyncSpec> {
        names
            .iter()
            .map(|(n, after)| {
                let mut s = SyncSpec::new(n, crate::spec::Model::Table(n.to_string()), n, &["id"]);
                s.after = after.iter().map(|a| a.to_string()).collect();
                s
            })
            .collect()
    }

    #[test]
    fn foreign_keys_and_after_make_the_order() {
        let s = specs(&[
            ("items", &[]),
            ("orders", &[]),
            ("customers", &["audit"]),
            ("audit", &[]),
        ]);
        // items -> orders -> customers (foreign keys), a self-reference ignored.
        let o = Order::new(&s, &[(0, 1), (1, 2), (2, 2)]).unwrap();
        assert_eq!(o.parents, vec![vec![1], vec![2], vec![], vec![]]);
        assert_eq!(o.after, vec![vec![], vec![], vec![3], vec![]]);
        assert_eq!(o.children(2), vec![1]);
        assert_eq!(o.children(3), Vec::<usize>::new());
    }

    #[test]
    fn cycles_and_unknown_names_are_config_errors() {
        let s = specs(&[("a", &["c"]), ("b", &[]), ("c", &[])]);
        // c references b, b references a, a runs after c.
        let e = Order::new(&s, &[(2, 1), (1, 0)]).unwrap_err().to_string();
        assert!(e.contains("cycle: a -> c -> b -> a"), "{e}");
        let s = specs(&[("a", &["nope"])]);
        let e = Order::new(&s, &[]).unwrap_err().to_string();
        assert!(e.contains("after = [\"nope\"] names no sync"), "{e}");
    }
}
