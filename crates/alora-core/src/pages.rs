//! Device residency of adapter weights, as bookkeeping only.
//!
//! On the device every (layer, module) has a pool of *rank rows* (`A_pool[R, in]`,
//! `Bt_pool[R, out]`). All pools share one row index space `[0, R)`, so an adapter of
//! rank r owns the same r row ids in every pool, and one [`RowPool`] describes them all.
//! Rows are handed out in pages of `page_rows`; an adapter takes `ceil(r / page_rows)`
//! pages, not necessarily contiguous, and uses the first r rows of them in page order.
//! Ranks are not padded to a maximum, so only the tail of the last page is wasted.
//!
//! Running requests pin their adapter; unpinned resident adapters are evicted least
//! recently used first when rows are needed. Every operation is O(log n) in the number
//! of resident adapters (plus the adapter's own pages/rows where they are built).

use std::collections::{BTreeMap, HashMap};

use crate::error::{Error, Result};

/// Adapter handle; the same alias as the adapter registry's.
pub type AdapterId = u64;

/// Outcome of [`RowPool::ensure_resident`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Residency {
    /// The adapter already held its rows; its weights are on the device.
    AlreadyResident,
    /// Rows were just allocated: the caller must copy the adapter's weights into `rows`
    /// (row j of the adapter goes to `rows[j]`). `evicted` lists the adapters whose rows
    /// were reclaimed to make room, least recently used first.
    Loaded {
        rows: Vec<u32>,
        evicted: Vec<AdapterId>,
    },
}

#[derive(Debug)]
struct Entry {
    pages: Vec<u32>,
    rows: Vec<u32>,
    pins: usize,
    /// Last `ensure_resident`/`touch`; the key in `lru` while unpinned.
    tick: u64,
}

/// Rank-row allocator shared by every adapter pool on the device.
#[derive(Debug)]
pub struct RowPool {
    page_rows: usize,
    num_pages: usize,
    /// Stack of free page ids; popped from the end, so a fresh pool hands out pages
    /// in ascending order.
    free_pages: Vec<u32>,
    entries: HashMap<AdapterId, Entry>,
    /// Unpinned resident adapters by recency. Pinned ones are kept out so eviction
    /// never has to skip over them.
    lru: BTreeMap<u64, AdapterId>,
    /// Pages held by unpinned adapters: what eviction could reclaim right now.
    evictable_pages: usize,
    tick: u64,
}

impl RowPool {
    /// A pool of `total_rows` rows (rounded down to whole pages) in pages of `page_rows`.
    pub fn new(total_rows: usize, page_rows: usize) -> Result<Self> {
        if page_rows == 0 {
            return Err(Error::Config {
                field: "page_rows".into(),
                detail: "must be at least 1".into(),
            });
        }
        if total_rows < page_rows {
            return Err(Error::Config {
                field: "total_rows".into(),
                detail: format!("{total_rows} rows is less than one page of {page_rows} rows"),
            });
        }
        let num_pages = total_rows / page_rows;
        // Row ids are u32 on the device side.
        if num_pages * page_rows > u32::MAX as usize {
            return Err(Error::Config {
                field: "total_rows".into(),
                detail: format!("{total_rows} rows exceeds the u32 row id space"),
            });
        }
        Ok(Self {
            page_rows,
            num_pages,
            free_pages: (0..num_pages as u32).rev().collect(),
            entries: HashMap::new(),
            lru: BTreeMap::new(),
            evictable_pages: 0,
            tick: 0,
        })
    }

    /// Rows in the pool: whole pages times `page_rows`.
    pub fn total_rows(&self) -> usize {
        self.num_pages * self.page_rows
    }

    /// Rows in free pages (excluding the unused tails of allocated pages).
    pub fn free_rows(&self) -> usize {
        self.free_pages.len() * self.page_rows
    }

    /// Rows held by unpinned resident adapters, i.e. reclaimable by eviction.
    pub fn evictable_rows(&self) -> usize {
        self.evictable_pages * self.page_rows
    }

    pub fn page_rows(&self) -> usize {
        self.page_rows
    }

    fn pages_for_rank(&self, rank: usize) -> usize {
        rank.div_ceil(self.page_rows)
    }

    /// Rows an adapter of `rank` occupies, counting the tail of its last page.
    pub fn rows_for_rank(&self, rank: usize) -> usize {
        self.pages_for_rank(rank) * self.page_rows
    }

    /// Whether an adapter of `rank` fits in an otherwise empty pool. Rank 0 never fits,
    /// as [`ensure_resident`](Self::ensure_resident) rejects it.
    pub fn fits_ever(&self, rank: usize) -> bool {
        rank > 0 && self.pages_for_rank(rank) <= self.num_pages
    }

    pub fn is_resident(&self, id: AdapterId) -> bool {
        self.entries.contains_key(&id)
    }

    /// The adapter's row ids, exactly `rank` of them: row j of the adapter is `rows[j]`.
    pub fn rows(&self, id: AdapterId) -> Option<&[u32]> {
        self.entries.get(&id).map(|e| e.rows.as_slice())
    }

    /// The adapter's page ids, in the order its rows use them.
    pub fn pages(&self, id: AdapterId) -> Option<&[u32]> {
        self.entries.get(&id).map(|e| e.pages.as_slice())
    }

    /// Rank of a resident adapter.
    pub fn rank(&self, id: AdapterId) -> Option<usize> {
        self.entries.get(&id).map(|e| e.rows.len())
    }

    /// Make `id` resident with `rank` rows, evicting unpinned adapters least recently
    /// used first, and only as many as needed. Marks `id` as most recently used.
    ///
    /// All or nothing: when the adapter cannot fit even after evicting every unpinned
    /// adapter, returns `Error::Capacity` and changes nothing (not even recency).
    /// A rank of 0, or a rank other than the resident one, is a `Config` error.
    pub fn ensure_resident(&mut self, id: AdapterId, rank: usize) -> Result<Residency> {
        if let Some(e) = self.entries.get(&id) {
            if e.rows.len() != rank {
                return Err(Error::Config {
                    field: "rank".into(),
                    detail: format!(
                        "adapter {id} is resident with rank {}, requested rank {rank}",
                        e.rows.len()
                    ),
                });
            }
            self.touch(id);
            return Ok(Residency::AlreadyResident);
        }
        if rank == 0 {
            return Err(Error::Config {
                field: "rank".into(),
                detail: format!("adapter {id} has rank 0"),
            });
        }
        let need = self.pages_for_rank(rank);
        let available = self.free_pages.len() + self.evictable_pages;
        if need > available {
            let why = if need > self.num_pages {
                "the whole pool is smaller".to_string()
            } else {
                format!(
                    "only {} rows are free or evictable, the rest are pinned",
                    available * self.page_rows
                )
            };
            return Err(Error::Capacity(format!(
                "adapter {id} of rank {rank} needs {} of {} adapter rows; {why}",
                need * self.page_rows,
                self.total_rows()
            )));
        }

        let mut evicted = Vec::new();
        while self.free_pages.len() < need {
            // Cannot be empty: `need <= available` was checked above.
            let (_, victim) = self.lru.pop_first().expect("evictable pages accounted");
            let e = self.entries.remove(&victim).expect("lru entry is resident");
            self.evictable_pages -= e.pages.len();
            self.free_pages.extend(e.pages.iter().rev());
            evicted.push(victim);
        }

        // Reversed so pages come out in pop order (ascending in a fresh pool).
        let mut pages = self.free_pages.split_off(self.free_pages.len() - need);
        pages.reverse();
        let page_rows = self.page_rows as u32;
        let rows: Vec<u32> = pages
            .iter()
            .flat_map(|&p| p * page_rows..(p + 1) * page_rows)
            .take(rank)
            .collect();
        self.tick += 1;
        self.lru.insert(self.tick, id);
        self.evictable_pages += pages.len();
        self.entries.insert(
            id,
            Entry {
                pages,
                rows: rows.clone(),
                pins: 0,
                tick: self.tick,
            },
        );
        Ok(Residency::Loaded { rows, evicted })
    }

    /// Whether [`ensure_resident`](Self::ensure_resident) would succeed now.
    pub fn can_make_resident(&self, id: AdapterId, rank: usize) -> bool {
        match self.entries.get(&id) {
            Some(e) => e.rows.len() == rank,
            None => {
                rank > 0
                    && self.pages_for_rank(rank) <= self.free_pages.len() + self.evictable_pages
            }
        }
    }

    /// Mark `id` as most recently used. Returns whether it is resident (a no-op if not).
    pub fn touch(&mut self, id: AdapterId) -> bool {
        let Some(e) = self.entries.get_mut(&id) else {
            return false;
        };
        self.tick += 1;
        if e.pins == 0 {
            self.lru.remove(&e.tick);
            self.lru.insert(self.tick, id);
        }
        e.tick = self.tick;
        true
    }

    /// Pin a resident adapter so it cannot be evicted. Pins are counted (one per running
    /// request). Does not change recency. `UnknownAdapter` if `id` is not resident.
    pub fn pin(&mut self, id: AdapterId) -> Result<()> {
        let e = self
            .entries
            .get_mut(&id)
            .ok_or_else(|| Error::UnknownAdapter(format!("{id}")))?;
        if e.pins == 0 {
            self.lru.remove(&e.tick);
            self.evictable_pages -= e.pages.len();
        }
        e.pins += 1;
        Ok(())
    }

    /// Release one pin. `UnknownAdapter` if `id` is not resident, `Config` if it holds
    /// no pins. Recency is that of its last `ensure_resident`/`touch`.
    pub fn unpin(&mut self, id: AdapterId) -> Result<()> {
        let e = self
            .entries
            .get_mut(&id)
            .ok_or_else(|| Error::UnknownAdapter(format!("{id}")))?;
        match e.pins {
            0 => Err(Error::Config {
                field: "pins".into(),
                detail: format!("unpin of adapter {id}, which is not pinned"),
            }),
            1 => {
                e.pins = 0;
                self.lru.insert(e.tick, id);
                self.evictable_pages += e.pages.len();
                Ok(())
            }
            _ => {
                e.pins -= 1;
                Ok(())
            }
        }
    }

    /// Number of pins on `id`; 0 if not resident.
    pub fn pin_count(&self, id: AdapterId) -> usize {
        self.entries.get(&id).map_or(0, |e| e.pins)
    }

    /// Drop `id`'s residency and free its rows (on unload). `Ok(false)` if it was not
    /// resident; `AdapterBusy` if it is pinned.
    pub fn evict(&mut self, id: AdapterId) -> Result<bool> {
        let Some(e) = self.entries.get(&id) else {
            return Ok(false);
        };
        if e.pins > 0 {
            return Err(Error::AdapterBusy {
                name: format!("{id}"),
                requests: e.pins,
            });
        }
        let e = self.entries.remove(&id).expect("checked above");
        self.lru.remove(&e.tick);
        self.evictable_pages -= e.pages.len();
        self.free_pages.extend(e.pages.iter().rev());
        Ok(true)
    }

    /// Resident adapters, in no particular order.
    pub fn resident(&self) -> Vec<AdapterId> {
        self.entries.keys().copied().collect()
    }

    pub fn num_resident(&self) -> usize {
        self.entries.len()
    }

    /// Unpinned resident adapters in eviction order (least recently used first).
    pub fn eviction_order(&self) -> Vec<AdapterId> {
        self.lru.values().copied().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashSet;

    fn loaded(r: Residency) -> (Vec<u32>, Vec<AdapterId>) {
        match r {
            Residency::Loaded { rows, evicted } => (rows, evicted),
            Residency::AlreadyResident => panic!("expected Loaded"),
        }
    }

    #[test]
    fn new_validates_and_rounds_down() {
        assert!(matches!(RowPool::new(16, 0), Err(Error::Config { .. })));
        assert!(matches!(RowPool::new(3, 4), Err(Error::Config { .. })));
        let p = RowPool::new(30, 8).unwrap();
        assert_eq!(p.total_rows(), 24);
        assert_eq!(p.free_rows(), 24);
        assert_eq!(p.page_rows(), 8);
        assert_eq!(p.rows_for_rank(1), 8);
        assert_eq!(p.rows_for_rank(9), 16);
        assert!(p.fits_ever(24));
        assert!(!p.fits_ever(25));
        assert!(!p.fits_ever(0));
    }

    #[test]
    fn rows_are_first_rank_rows_of_pages() {
        let mut p = RowPool::new(32, 4).unwrap();
        let (rows, evicted) = loaded(p.ensure_resident(1, 6).unwrap());
        assert_eq!(rows, vec![0, 1, 2, 3, 4, 5]);
        assert!(evicted.is_empty());
        assert_eq!(p.rows(1), Some(&rows[..]));
        assert_eq!(p.rank(1), Some(6));
        assert_eq!(p.free_rows(), 24);
        assert_eq!(p.ensure_resident(1, 6).unwrap(), Residency::AlreadyResident);
        // A different rank for a resident adapter is a caller bug, not a reload.
        assert!(matches!(p.ensure_resident(1, 8), Err(Error::Config { .. })));
        assert!(matches!(p.ensure_resident(2, 0), Err(Error::Config { .. })));
    }

    #[test]
    fn pages_need_not_be_contiguous() {
        let mut p = RowPool::new(12, 4).unwrap();
        p.ensure_resident(1, 4).unwrap(); // page 0
        p.ensure_resident(2, 4).unwrap(); // page 1
        p.ensure_resident(3, 4).unwrap(); // page 2
        p.evict(1).unwrap();
        p.evict(3).unwrap();
        let (rows, _) = loaded(p.ensure_resident(4, 7).unwrap());
        let pages: HashSet<u32> = rows.iter().map(|r| r / 4).collect();
        assert_eq!(pages, HashSet::from([0, 2]));
        assert_eq!(rows.len(), 7);
    }

    #[test]
    fn evicts_lru_unpinned_only_as_needed() {
        let mut p = RowPool::new(16, 4).unwrap();
        for id in 1..=4 {
            p.ensure_resident(id, 4).unwrap();
        }
        p.touch(1); // order now 2, 3, 4, 1
        p.pin(2).unwrap();
        assert_eq!(p.eviction_order(), vec![3, 4, 1]);
        let (_, evicted) = loaded(p.ensure_resident(5, 8).unwrap());
        assert_eq!(evicted, vec![3, 4]);
        assert!(p.is_resident(1) && p.is_resident(2) && p.is_resident(5));
        assert_eq!(p.num_resident(), 3);
    }

    #[test]
    fn failed_ensure_changes_nothing() {
        let mut p = RowPool::new(16, 4).unwrap();
        p.ensure_resident(1, 8).unwrap();
        p.ensure_resident(2, 4).unwrap();
        p.pin(1).unwrap();
        assert!(!p.can_make_resident(3, 12));
        assert!(matches!(p.ensure_resident(3, 12), Err(Error::Capacity(_))));
        assert!(p.is_resident(2));
        assert_eq!(p.free_rows(), 4);
        assert!(p.can_make_resident(3, 8));
        assert!(matches!(p.ensure_resident(9, 17), Err(Error::Capacity(_))));
    }

    #[test]
    fn pins_are_counted_and_block_eviction() {
        let mut p = RowPool::new(8, 4).unwrap();
        assert!(matches!(p.pin(1), Err(Error::UnknownAdapter(_))));
        p.ensure_resident(1, 3).unwrap();
        p.pin(1).unwrap();
        p.pin(1).unwrap();
        assert_eq!(p.pin_count(1), 2);
        assert!(matches!(
            p.evict(1),
            Err(Error::AdapterBusy { requests: 2, .. })
        ));
        p.unpin(1).unwrap();
        assert!(p.evict(1).is_err());
        p.unpin(1).unwrap();
        assert!(matches!(p.unpin(1), Err(Error::Config { .. })));
        assert!(p.evict(1).unwrap());
        assert!(!p.evict(1).unwrap());
        assert!(matches!(p.unpin(1), Err(Error::UnknownAdapter(_))));
        assert_eq!(p.free_rows(), p.total_rows());
    }

    #[derive(Debug, Clone)]
    enum Op {
        Ensure(AdapterId),
        EnsureWrongRank(AdapterId),
        Pin(AdapterId),
        Unpin(AdapterId),
        Evict(AdapterId),
        Touch(AdapterId),
    }

    const IDS: u64 = 12;

    fn op() -> impl Strategy<Value = Op> {
        let id = 0..IDS;
        prop_oneof![
            4 => id.clone().prop_map(Op::Ensure),
            1 => id.clone().prop_map(Op::EnsureWrongRank),
            2 => id.clone().prop_map(Op::Pin),
            2 => id.clone().prop_map(Op::Unpin),
            1 => id.clone().prop_map(Op::Evict),
            2 => id.prop_map(Op::Touch),
        ]
    }

    /// Reference model: rank, pins and last-use tick per resident adapter.
    #[derive(Default)]
    struct Model {
        resident: HashMap<AdapterId, (usize, usize, u64)>,
        tick: u64,
    }

    impl Model {
        fn bump(&mut self, id: AdapterId) {
            self.tick += 1;
            if let Some(e) = self.resident.get_mut(&id) {
                e.2 = self.tick;
            }
        }
        fn lru_unpinned(&self) -> Vec<AdapterId> {
            let mut v: Vec<_> = self
                .resident
                .iter()
                .filter(|(_, e)| e.1 == 0)
                .map(|(&id, e)| (e.2, id))
                .collect();
            v.sort();
            v.into_iter().map(|(_, id)| id).collect()
        }
    }

    type Snapshot = (Vec<(AdapterId, Vec<u32>, usize)>, usize, Vec<AdapterId>);

    fn snapshot(p: &RowPool) -> Snapshot {
        let mut v: Vec<_> = p
            .resident()
            .into_iter()
            .map(|id| (id, p.rows(id).unwrap().to_vec(), p.pin_count(id)))
            .collect();
        v.sort();
        (v, p.free_rows(), p.eviction_order())
    }

    fn check(p: &RowPool, m: &Model) {
        let mut seen = HashSet::new();
        let mut allocated = 0;
        let pr = p.page_rows() as u32;
        assert_eq!(p.num_resident(), m.resident.len());
        for (&id, &(rank, pins, _)) in &m.resident {
            let rows = p.rows(id).expect("model says resident");
            let pages = p.pages(id).unwrap();
            assert_eq!(rows.len(), rank);
            assert_eq!(pages.len(), p.pages_for_rank(rank));
            assert_eq!(p.pin_count(id), pins);
            for (j, &r) in rows.iter().enumerate() {
                assert!((r as usize) < p.total_rows());
                assert!(seen.insert(r), "row {r} shared");
                assert_eq!(r, pages[j / pr as usize] * pr + (j as u32 % pr));
            }
            allocated += pages.len() * p.page_rows();
        }
        assert_eq!(p.free_rows() + allocated, p.total_rows());
        assert_eq!(p.eviction_order(), m.lru_unpinned());
        let evictable: usize = m
            .resident
            .values()
            .filter(|e| e.1 == 0)
            .map(|e| p.rows_for_rank(e.0))
            .sum();
        assert_eq!(p.evictable_rows(), evictable);
    }

    proptest! {
        #[test]
        fn random_ops_keep_invariants(
            page_rows in 1usize..=32,
            pages in 1usize..=40,
            extra in 0usize..32,
            ranks in proptest::collection::vec(1usize..=128, IDS as usize),
            ops in proptest::collection::vec(op(), 1..200),
        ) {
            let mut p = RowPool::new(pages * page_rows + extra % page_rows, page_rows).unwrap();
            prop_assert_eq!(p.total_rows(), pages * page_rows);
            let mut m = Model::default();
            for op in ops {
                let before = snapshot(&p);
                match op {
                    Op::Ensure(id) => {
                        let rank = ranks[id as usize];
                        let can = p.can_make_resident(id, rank);
                        let expect_evicted = if m.resident.contains_key(&id) {
                            None
                        } else {
                            let need = p.pages_for_rank(rank);
                            let mut free = p.free_rows() / page_rows;
                            let mut ev = Vec::new();
                            for v in m.lru_unpinned() {
                                if free >= need { break; }
                                free += p.pages_for_rank(m.resident[&v].0);
                                ev.push(v);
                            }
                            (free >= need).then_some(ev)
                        };
                        match p.ensure_resident(id, rank) {
                            Ok(Residency::AlreadyResident) => {
                                prop_assert!(can && m.resident.contains_key(&id));
                                m.bump(id);
                            }
                            Ok(Residency::Loaded { rows, evicted }) => {
                                prop_assert!(can);
                                prop_assert_eq!(Some(&evicted), expect_evicted.as_ref());
                                prop_assert_eq!(p.rows(id), Some(&rows[..]));
                                for v in &evicted {
                                    prop_assert_eq!(m.resident[v].1, 0);
                                    m.resident.remove(v);
                                }
                                m.resident.insert(id, (rank, 0, 0));
                                m.bump(id);
                            }
                            Err(e) => {
                                prop_assert!(matches!(e, Error::Capacity(_)));
                                prop_assert!(!can && expect_evicted.is_none());
                                prop_assert_eq!(snapshot(&p), before);
                            }
                        }
                    }
                    Op::EnsureWrongRank(id) => {
                        if let Some(&(rank, ..)) = m.resident.get(&id) {
                            prop_assert!(!p.can_make_resident(id, rank + 1));
                            prop_assert!(p.ensure_resident(id, rank + 1).is_err());
                            prop_assert_eq!(snapshot(&p), before);
                        }
                    }
                    Op::Pin(id) => match m.resident.get_mut(&id) {
                        Some(e) => { p.pin(id).unwrap(); e.1 += 1; }
                        None => prop_assert!(p.pin(id).is_err()),
                    },
                    Op::Unpin(id) => match m.resident.get_mut(&id) {
                        Some(e) if e.1 > 0 => { p.unpin(id).unwrap(); e.1 -= 1; }
                        _ => {
                            prop_assert!(p.unpin(id).is_err());
                            prop_assert_eq!(snapshot(&p), before);
                        }
                    },
                    Op::Evict(id) => match m.resident.get(&id) {
                        Some(e) if e.1 > 0 => {
                            prop_assert!(p.evict(id).is_err());
                            prop_assert_eq!(snapshot(&p), before);
                        }
                        Some(_) => {
                            prop_assert!(p.evict(id).unwrap());
                            m.resident.remove(&id);
                        }
                        None => prop_assert!(!p.evict(id).unwrap()),
                    },
                    Op::Touch(id) => {
                        prop_assert_eq!(p.touch(id), m.resident.contains_key(&id));
                        m.bump(id);
                    }
                }
                check(&p, &m);
            }
            // Reclaims everything once all pins are released.
            for (id, (_, pins, _)) in m.resident.clone() {
                for _ in 0..pins {
                    p.unpin(id).unwrap();
                }
                prop_assert!(p.evict(id).unwrap());
            }
            prop_assert_eq!(p.free_rows(), p.total_rows());
            prop_assert_eq!(p.num_resident(), 0);
            prop_assert!(p.eviction_order().is_empty());
        }
    }
}
