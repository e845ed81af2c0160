//! Adapters on the device, as bookkeeping only: which memory units each resident adapter
//! holds (with pins and recency), and where inside those units its rank rows lie.
//!
//! The device has one pool of *units* (see [`crate::kv::BlockPool`]): unit `u` is KV block
//! `u` in every layer, or a piece of adapter storage. In one layer a unit is two *pieces* of
//! `P = block_size * kv_dim` elements (its K slots and its V slots). An adapter's rank row j
//! of module m is two *items*: its A row (`in_m` elements) and its Bt row (`out_m`), each
//! placed inside one piece, at the same place in every layer. Items are addressed by *row
//! ids*: row id `c` starts at element `c * g` of the layer's flat arena (K side then V side),
//! where the granularity `g` divides `P` and every feature width. An adapter holds only the rows its
//! targeted modules need, at each module's own rank: no padding to a maximum rank.

use std::collections::{BTreeMap, HashMap};

use crate::error::{Error, Result};
use crate::kv::BlockId;

/// Adapter handle; the same alias as the adapter registry's.
pub type AdapterId = u64;

/// How adapter rows map onto units: fixed per engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnitGeometry {
    /// Elements of one piece (one unit, one layer, one of K/V).
    pub piece_elems: usize,
    /// Row-id granularity in elements.
    pub granularity: usize,
    /// (in, out) features of each module: the widths of its A and Bt items, in elements.
    pub item_elems: Vec<(usize, usize)>,
    pub num_units: usize,
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

impl UnitGeometry {
    /// `modules`: (name, in_features, out_features) in engine order; a piece is
    /// `block_size * kv_dim` elements.
    pub fn new(
        block_size: usize,
        kv_dim: usize,
        modules: &[(String, usize, usize)],
        num_units: usize,
    ) -> Result<Self> {
        let piece_elems = block_size * kv_dim;
        if piece_elems == 0 {
            return Err(Error::Config {
                field: "kv_dim".into(),
                detail: "block_size × kv_dim must be at least 1".into(),
            });
        }
        let mut g = piece_elems;
        let mut items = Vec::with_capacity(modules.len());
        for (name, i, o) in modules {
            let w = *i.max(o);
            if w > piece_elems {
                return Err(Error::Config {
                    field: "block_size".into(),
                    detail: format!(
                        "a rank row of `{name}` ({w} elements) does not fit in one KV block's \
                         share of a layer (block_size {block_size} × kv_dim {kv_dim} = \
                         {piece_elems} elements); raise block_size to at least {}",
                        w.div_ceil(kv_dim)
                    ),
                });
            }
            g = gcd(gcd(g, *i), *o);
            items.push((*i, *o));
        }
        // Row ids are i32 over a layer's whole arena (2 pieces per unit).
        let chunks = 2u128 * num_units as u128 * piece_elems as u128 / g as u128;
        if chunks > i32::MAX as u128 {
            return Err(Error::Config {
                field: "num_blocks".into(),
                detail: format!(
                    "{num_units} units of {piece_elems} elements exceed the 32-bit row id space"
                ),
            });
        }
        Ok(Self {
            piece_elems,
            granularity: g,
            item_elems: items,
            num_units,
        })
    }

    fn piece_chunks(&self) -> usize {
        self.piece_elems / self.granularity
    }

    /// Units an adapter with these per-module ranks occupies.
    pub fn units_for(&self, module_ranks: &[usize]) -> usize {
        pack(self, module_ranks).0.div_ceil(2)
    }

    /// Row ids of an adapter's rows given its units (see [`AdapterRows`]).
    ///
    /// On consecutive units, the K sides of the run form one contiguous region per layer
    /// (and so do the V sides): each module's A and Bt matrices are then laid out whole, row
    /// after row, when they fit, so that the LoRA op reads them as strided views.
    pub fn rows(&self, module_ranks: &[usize], units: &[BlockId]) -> AdapterRows {
        let consecutive = units.windows(2).all(|w| w[1] == w[0] + 1);
        if let (true, Some(&first)) = (consecutive, units.first()) {
            if let Some(r) = self.matrix_rows(module_ranks, first as usize, units.len()) {
                return r;
            }
        }
        let (pieces, place) = pack(self, module_ranks);
        debug_assert!(pieces.div_ceil(2) <= units.len());
        let pc = self.piece_chunks();
        let side_chunks = self.num_units * pc; // chunks of one side (K or V) of a layer
        let id = |(piece, offset): (usize, usize)| {
            let unit = units[piece / 2] as usize;
            ((piece % 2) * side_chunks + unit * pc + offset) as i32
        };
        let mut r = AdapterRows {
            row_start: vec![0],
            a_rows: Vec::new(),
            bt_rows: Vec::new(),
        };
        for (a_place, bt_place) in place {
            r.a_rows.extend(a_place.into_iter().map(id));
            r.bt_rows.extend(bt_place.into_iter().map(id));
            r.row_start.push(r.a_rows.len() as i32);
        }
        r
    }
}

impl UnitGeometry {
    /// Whole matrices in the two regions of `n` consecutive units from `first` (K sides,
    /// V sides), first-fit decreasing by size; `None` when they do not fit.
    fn matrix_rows(&self, module_ranks: &[usize], first: usize, n: usize) -> Option<AdapterRows> {
        let g = self.granularity;
        let region = n * self.piece_chunks();
        let base = [
            first * self.piece_chunks(),
            (self.num_units + first) * self.piece_chunks(),
        ];
        // (chunks, module, side) of every matrix, largest first.
        let mut mats: Vec<(usize, usize, usize)> = Vec::new();
        for (m, &r) in module_ranks.iter().enumerate() {
            if r > 0 {
                let (i, o) = self.item_elems[m];
                mats.push((r * i / g, m, 0));
                mats.push((r * o / g, m, 1));
            }
        }
        mats.sort_by_key(|&(size, m, side)| (std::cmp::Reverse(size), m, side));
        let mut used = [0usize; 2];
        let mut start = vec![[0usize; 2]; module_ranks.len()];
        for (size, m, side) in mats {
            let bin = (0..2).find(|&b| used[b] + size <= region)?;
            start[m][side] = base[bin] + used[bin];
            used[bin] += size;
        }
        let mut r = AdapterRows {
            row_start: vec![0],
            a_rows: Vec::new(),
            bt_rows: Vec::new(),
        };
        for (m, &rank) in module_ranks.iter().enumerate() {
            let (i, o) = self.item_elems[m];
            for j in 0..rank {
                r.a_rows.push((start[m][0] + j * i / g) as i32);
                r.bt_rows.push((start[m][1] + j * o / g) as i32);
            }
            r.row_start.push(r.a_rows.len() as i32);
        }
        Some(r)
    }
}

/// Where a resident adapter's rows are: module m's A rows at
/// `a_rows[row_start[m]..row_start[m+1]]` (row j first), its Bt rows at the same range of
/// `bt_rows`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AdapterRows {
    pub row_start: Vec<i32>,
    pub a_rows: Vec<i32>,
    pub bt_rows: Vec<i32>,
}

type Placement = Vec<(usize, usize)>;

/// First-fit decreasing: every A row and every Bt row is an item of its width, packed into
/// pieces. Deterministic, so the unit count computed at registration holds at page-in.
/// Returns (pieces used, per module the (piece, chunk offset) of each A row and Bt row).
fn pack(geo: &UnitGeometry, module_ranks: &[usize]) -> (usize, Vec<(Placement, Placement)>) {
    let g = geo.granularity;
    let cap = geo.piece_chunks();
    // (width in chunks, module, side): widest first, ties by module then side.
    let mut kinds: Vec<(usize, usize, usize)> = Vec::new();
    for (m, &r) in module_ranks.iter().enumerate() {
        if r > 0 {
            let (i, o) = geo.item_elems[m];
            kinds.push((i / g, m, 0));
            kinds.push((o / g, m, 1));
        }
    }
    kinds.sort_by_key(|&(w, m, side)| (std::cmp::Reverse(w), m, side));
    let mut used: Vec<usize> = Vec::new(); // chunks used per open piece
    let mut place: Vec<(Placement, Placement)> = module_ranks
        .iter()
        .map(|_| (Vec::new(), Vec::new()))
        .collect();
    for (size, m, side) in kinds {
        // Pieces before `first` are too full for this size; sizes only shrink.
        let mut first = 0;
        for _ in 0..module_ranks[m] {
            while first < used.len() && used[first] + size > cap {
                first += 1;
            }
            if first == used.len() {
                used.push(0);
            }
            let slot = (first, used[first]);
            if side == 0 {
                place[m].0.push(slot);
            } else {
                place[m].1.push(slot);
            }
            used[first] += size;
        }
    }
    (used.len(), place)
}

/// Outcome of making an adapter resident.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Residency {
    /// The adapter already held its units; its weights are on the device.
    AlreadyResident,
    /// Units were just assigned: the caller must write the adapter's rows into them.
    /// `evicted` lists the adapters evicted to make room, least recently used first.
    Loaded {
        units: Vec<BlockId>,
        evicted: Vec<AdapterId>,
    },
}

#[derive(Debug)]
struct Entry {
    units: Vec<BlockId>,
    pins: usize,
    /// Last use, on the pool's clock; the key in `lru` while unpinned.
    tick: u64,
}

/// Resident adapters: the units each holds, pins, and the LRU of the unpinned ones. Units
/// come from and go back to the pool that owns this set; it decides what to evict.
#[derive(Debug, Default)]
pub struct ResidentAdapters {
    entries: HashMap<AdapterId, Entry>,
    lru: BTreeMap<u64, AdapterId>,
    units: usize,
    evictable_units: usize,
}

impl ResidentAdapters {
    pub fn is_resident(&self, id: AdapterId) -> bool {
        self.entries.contains_key(&id)
    }
    pub fn units(&self, id: AdapterId) -> Option<&[BlockId]> {
        self.entries.get(&id).map(|e| e.units.as_slice())
    }
    pub fn pin_count(&self, id: AdapterId) -> usize {
        self.entries.get(&id).map_or(0, |e| e.pins)
    }
    /// Units held by resident adapters.
    pub fn num_units(&self) -> usize {
        self.units
    }
    /// Units held by unpinned adapters: what eviction could reclaim.
    pub fn evictable_units(&self) -> usize {
        self.evictable_units
    }
    pub fn num_resident(&self) -> usize {
        self.entries.len()
    }
    pub fn resident(&self) -> Vec<AdapterId> {
        self.entries.keys().copied().collect()
    }
    /// (tick, id) of the least recently used unpinned adapter.
    pub fn lru_head(&self) -> Option<(u64, AdapterId)> {
        self.lru.first_key_value().map(|(&t, &id)| (t, id))
    }

    pub(crate) fn insert(&mut self, id: AdapterId, units: Vec<BlockId>, tick: u64) {
        self.units += units.len();
        self.evictable_units += units.len();
        self.lru.insert(tick, id);
        self.entries.insert(
            id,
            Entry {
                units,
                pins: 0,
                tick,
            },
        );
    }

    /// Remove an unpinned adapter, returning its units.
    pub(crate) fn remove(&mut self, id: AdapterId) -> Result<Option<Vec<BlockId>>> {
        let Some(e) = self.entries.get(&id) else {
            return Ok(None);
        };
        if e.pins > 0 {
            return Err(Error::AdapterBusy {
                name: format!("{id}"),
                requests: e.pins,
            });
        }
        let e = self.entries.remove(&id).expect("checked above");
        self.lru.remove(&e.tick);
        self.units -= e.units.len();
        self.evictable_units -= e.units.len();
        Ok(Some(e.units))
    }

    pub(crate) fn touch(&mut self, id: AdapterId, tick: u64) -> bool {
        let Some(e) = self.entries.get_mut(&id) else {
            return false;
        };
        if e.pins == 0 {
            self.lru.remove(&e.tick);
            self.lru.insert(tick, id);
        }
        e.tick = tick;
        true
    }

    /// Pins are counted (one per running request); recency is unchanged.
    pub fn pin(&mut self, id: AdapterId) -> Result<()> {
        let e = self
            .entries
            .get_mut(&id)
            .ok_or_else(|| Error::UnknownAdapter(format!("{id}")))?;
        if e.pins == 0 {
            self.lru.remove(&e.tick);
            self.evictable_units -= e.units.len();
        }
        e.pins += 1;
        Ok(())
    }

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
                self.evictable_units += e.units.len();
                Ok(())
            }
            _ => {
                e.pins -= 1;
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashSet;

    fn geo(piece: usize, widths: &[(usize, usize)], units: usize) -> UnitGeometry {
        let mods: Vec<_> = widths
            .iter()
            .enumerate()
            .map(|(i, &(a, b))| (format!("m{i}"), a, b))
            .collect();
        UnitGeometry::new(1, piece, &mods, units).unwrap()
    }

    #[test]
    fn smollm2_granularity_and_units() {
        // SmolLM2-135M: hidden 576, kv_dim 192, intermediate 1536; block_size 16.
        let d = [
            (576, 576),
            (576, 192),
            (576, 192),
            (576, 576),
            (576, 1536),
            (576, 1536),
            (1536, 576),
        ];
        let g = geo(16 * 192, &d, 100);
        assert_eq!(g.granularity, 192);
        // q/v only at rank 16: 48 items of 3 chunks and 16 of 1 chunk, in pieces of 16.
        let qv = [16, 0, 16, 0, 0, 0, 0];
        let units = g.units_for(&qv);
        let exact = (16 * (1152 + 768)) as f64 / (2.0 * 3072.0);
        assert_eq!(units, exact.ceil() as usize);
        // Fewer units than an all-module adapter of the same rank.
        assert!(units < g.units_for(&[16; 7]));
    }

    #[test]
    fn consecutive_units_hold_whole_matrices() {
        // Demo model shapes: hidden 512, kv_dim 256, block_size 16 (P = 4096).
        let d = [(512, 512), (512, 256), (512, 256), (512, 512)];
        let g = geo(16 * 256, &d, 64);
        let ranks = [16, 16, 16, 16];
        let n = g.units_for(&ranks);
        let units: Vec<BlockId> = (10..10 + n as u32).collect();
        let r = g.rows(&ranks, &units);
        for (m, &(i, o)) in d.iter().enumerate() {
            let span = r.row_start[m] as usize..r.row_start[m + 1] as usize;
            for (ids, w) in [(&r.a_rows[span.clone()], i), (&r.bt_rows[span], o)] {
                let step = (w / g.granularity) as i32;
                assert!(ids.windows(2).all(|p| p[1] - p[0] == step), "module {m}");
            }
        }
        // Scattered units: rows placed one by one, not whole matrices.
        let scattered: Vec<BlockId> = (0..n as u32).map(|i| 3 * i).collect();
        let r = g.rows(&ranks, &scattered);
        let q = &r.a_rows[..16];
        assert!(!q.windows(2).all(|p| p[1] - p[0] == q[1] - q[0]));
    }

    #[test]
    fn oversized_rows_and_row_space_are_refused() {
        let mods = vec![("up".to_string(), 64, 320)];
        let e = UnitGeometry::new(4, 32, &mods, 4).unwrap_err();
        assert!(
            e.to_string().contains("raise block_size to at least 10"),
            "{e}"
        );
        // A and Bt rows are placed apart: each need only fit alone.
        let mods = vec![("up".to_string(), 64, 128)];
        assert!(UnitGeometry::new(4, 32, &mods, 4).is_ok());
        let mods = vec![("q".to_string(), 1, 1)];
        assert!(UnitGeometry::new(1, 2, &mods, usize::MAX / 8).is_err());
    }

    proptest! {
        /// Rows lie inside the adapter's own units, never overlap, and every module gets
        /// exactly its rank of rows, whatever the dims, ranks and (scattered) units.
        #[test]
        fn rows_are_disjoint_and_inside_owned_units(
            dims in proptest::collection::vec((1usize..6, 1usize..6), 1..5),
            ranks in proptest::collection::vec(0usize..20, 5),
            piece_mult in 1usize..4,
            seed in 0u64..1000,
        ) {
            let g0 = 8;
            let widths: Vec<(usize, usize)> = dims.iter().map(|&(a, b)| (a * g0, b * g0)).collect();
            let max_w = widths.iter().map(|&(a, b)| a.max(b)).max().unwrap();
            let piece = max_w * piece_mult;
            let total_units = 64;
            let g = geo(piece, &widths, total_units);
            let ranks = &ranks[..widths.len()];
            let need = g.units_for(ranks);
            prop_assume!(need <= total_units);
            // Scattered units.
            let mut all: Vec<BlockId> = (0..total_units as u32).collect();
            let mut s = seed;
            for i in (1..all.len()).rev() {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                all.swap(i, (s >> 33) as usize % (i + 1));
            }
            // Consecutive units (whole matrices) or scattered ones (rows placed singly).
            let lo = (total_units - need).min(3) as u32;
            let run: Vec<BlockId> = (lo..lo + need as u32).collect();
            let units = if seed % 2 == 0 { &run[..] } else { &all[..need] };
            let rows = g.rows(ranks, units);
            prop_assert_eq!(rows.row_start.len(), ranks.len() + 1);
            let side = total_units * piece;
            let owned: HashSet<(usize, usize)> = units
                .iter()
                .flat_map(|&u| [(0usize, u as usize), (1, u as usize)])
                .collect();
            let mut used: HashSet<usize> = HashSet::new();
            for (m, &r) in ranks.iter().enumerate() {
                let span = rows.row_start[m] as usize..rows.row_start[m + 1] as usize;
                let lists = [
                    (&rows.a_rows[span.clone()], widths[m].0),
                    (&rows.bt_rows[span], widths[m].1),
                ];
                for (ids, w) in lists {
                    prop_assert_eq!(ids.len(), r);
                    for &c in ids {
                        let start = c as usize * g.granularity;
                        for e in start..start + w {
                            let unit = (e % side) / piece;
                            prop_assert!(owned.contains(&(e / side, unit)), "row outside owned units");
                            prop_assert!(used.insert(e), "element {} used twice", e);
                        }
                    }
                }
            }
        }
    }
}
