use super::*;
use proptest::prelude::*;

/// A random problem: an arena, two pools inside it, segments over a step's tokens.
#[derive(Debug, Clone)]
struct Problem {
    tokens: usize,
    din: usize,
    dout: usize,
    arena: Vec<f32>,
    a: RowPool,
    bt: RowPool,
    x: Vec<f32>,
    y: Vec<f32>,
    token_idx: Vec<i64>,
    seg_start: Vec<i64>,
    seg_row_start: Vec<i64>,
    rows: Vec<i64>,
    bt_rows: Vec<i64>,
    seg_scale: Vec<f32>,
}

impl Problem {
    fn segments(&self) -> Segments<'_> {
        Segments {
            token_idx: &self.token_idx,
            seg_start: &self.seg_start,
            seg_row_start: &self.seg_row_start,
            rows: &self.rows,
            bt_rows: &self.bt_rows,
            seg_scale: &self.seg_scale,
        }
    }

    /// The float64 reference: y + delta.
    fn reference(&self) -> Vec<f64> {
        let mut y: Vec<f64> = self.y.iter().map(|&v| v as f64).collect();
        let row = |p: RowPool, id: i64| &self.arena[p.offset + id as usize * p.stride..][..p.width];
        for s in 0..self.seg_scale.len() {
            let (r0, r1) = (
                self.seg_row_start[s] as usize,
                self.seg_row_start[s + 1] as usize,
            );
            let (t0, t1) = (self.seg_start[s] as usize, self.seg_start[s + 1] as usize);
            for &t in &self.token_idx[t0..t1] {
                let xt = &self.x[t as usize * self.din..][..self.din];
                for j in r0..r1 {
                    let v: f64 = row(self.a, self.rows[j])
                        .iter()
                        .zip(xt)
                        .map(|(&p, &q)| p as f64 * q as f64)
                        .sum();
                    let c = v * self.seg_scale[s] as f64;
                    for (o, &b) in row(self.bt, self.bt_rows[j]).iter().enumerate() {
                        y[t as usize * self.dout + o] += c * b as f64;
                    }
                }
            }
        }
        y
    }
}

fn problem() -> impl Strategy<Value = Problem> {
    (
        1usize..6,
        1usize..70,
        1usize..70,
        1usize..5,
        0usize..4,
        0usize..4,
    )
        .prop_flat_map(|(tokens, din, dout, nseg, gran_a, gran_b)| {
            // Row strides: a granularity smaller than, equal to or larger than the width.
            let sa = [1, din.div_ceil(2), din, din + 3][gran_a];
            let sb = [1, dout.div_ceil(2), dout, dout + 5][gran_b];
            let rows_per_pool = 40usize;
            let arena_len = 7 + rows_per_pool * sa + din + rows_per_pool * sb + dout;
            let seg = (
                prop::collection::vec(0..tokens as i64, 0..4),
                0usize..9,
                -2.0f32..2.0,
            );
            (
                prop::collection::vec(-1.0f32..1.0, arena_len),
                prop::collection::vec(-1.0f32..1.0, tokens * din),
                prop::collection::vec(-1.0f32..1.0, tokens * dout),
                prop::collection::vec(seg, nseg),
                prop::collection::vec(0..rows_per_pool as i64, 64),
                prop::collection::vec(0..rows_per_pool as i64, 64),
            )
                .prop_map(move |(arena, x, y, segs, rpick, bpick)| {
                    let a = RowPool {
                        offset: 7,
                        stride: sa,
                        width: din,
                    };
                    let bt_off = 7 + rows_per_pool * sa + din;
                    let bt = RowPool {
                        offset: bt_off,
                        stride: sb,
                        width: dout,
                    };
                    let (mut token_idx, mut seg_start, mut seg_row_start) =
                        (vec![], vec![0i64], vec![0i64]);
                    let (mut rows, mut bt_rows, mut seg_scale) = (vec![], vec![], vec![]);
                    for (toks, rank, scale) in segs {
                        token_idx.extend(&toks);
                        seg_start.push(token_idx.len() as i64);
                        for j in 0..rank {
                            rows.push(rpick[(rows.len() + j) % rpick.len()]);
                            bt_rows.push(bpick[(bt_rows.len() + j) % bpick.len()]);
                        }
                        seg_row_start.push(rows.len() as i64);
                        seg_scale.push(scale);
                    }
                    Problem {
                        tokens,
                        din,
                        dout,
                        arena,
                        a,
                        bt,
                        x,
                        y,
                        token_idx,
                        seg_start,
                        seg_row_start,
                        rows,
                        bt_rows,
                        seg_scale,
                    }
                })
        })
}

proptest! {
    #[test]
    fn matches_float64_reference(p in problem()) {
        let want = p.reference();
        let mut y = p.y.clone();
        add_lora(&mut y, &p.x, &p.arena, p.a, &p.arena, p.bt, &p.segments()).unwrap();
        let tol = 1e-4 * (1.0 + p.din.max(p.dout) as f64);
        for (k, (&got, &w)) in y.iter().zip(&want).enumerate() {
            prop_assert!((got as f64 - w).abs() <= tol, "y[{}] = {} want {}", k, got, w);
        }
        prop_assert_eq!(y.len(), p.tokens * p.dout);
    }

    #[test]
    fn refusals_write_nothing(p in problem(), which in 0usize..6) {
        let mut p = p;
        match which {
            0 => p.token_idx.push(p.tokens as i64),                    // token out of range
            1 => p.rows.push(0),                                       // rows longer than starts
            2 => { let n = p.seg_start.len(); p.seg_start[n - 1] += 1 } // starts past the end
            3 => p.a.offset = p.arena.len(),                           // rows outside the arena
            4 => p.x.pop().map(|_| ()).unwrap_or(()),                  // x shorter than tokens
            _ => p.seg_scale.push(1.0),                                // one scale too many
        }
        if which == 4 && p.x.len() == p.tokens * p.din {
            return Ok(());
        }
        if which == 3 && p.rows.is_empty() {
            return Ok(()); // no row is read: nothing to refuse
        }
        let before = p.y.clone();
        let mut y = p.y.clone();
        let res = add_lora(&mut y, &p.x, &p.arena, p.a, &p.arena, p.bt, &p.segments());
        prop_assert!(res.is_err(), "case {} accepted", which);
        prop_assert_eq!(y, before);
    }
}

#[test]
fn row_past_the_arena_is_named() {
    let arena = vec![0f32; 10];
    let pool = RowPool {
        offset: 0,
        stride: 4,
        width: 4,
    };
    let (mut y, x) = (vec![0f32; 4], vec![0f32; 4]);
    let seg = Segments {
        token_idx: &[0],
        seg_start: &[0, 1],
        seg_row_start: &[0, 1],
        rows: &[2],
        bt_rows: &[0],
        seg_scale: &[1.0],
    };
    let e = add_lora(&mut y, &x, &arena, pool, &arena, pool, &seg).unwrap_err();
    assert!(e.0.contains("A row 2"), "{e}");
}

proptest! {
    /// Grouping rows in the shrink changes no result: bit for bit the single-row `dot`.
    #[test]
    fn grouped_dot_is_dot(
        n in 1usize..200,
        seed in prop::collection::vec(-1.0f32..1.0, 5 * 200),
    ) {
        let rows: [&[f32]; GROUP] = std::array::from_fn(|g| &seed[g * 200..][..n]);
        let x = &seed[4 * 200..][..n];
        let got = dot_group(&rows, x);
        for g in 0..GROUP {
            prop_assert_eq!(got[g].to_bits(), dot(rows[g], x).to_bits());
        }
    }
}

proptest! {
    /// Grouping rows in the expand changes no result: bit for bit `GROUP` calls of `axpy`.
    #[test]
    fn grouped_axpy_is_axpy(
        n in 1usize..200,
        seed in prop::collection::vec(-1.0f32..1.0, 5 * 200),
        c in prop::array::uniform4(-2.0f32..2.0),
    ) {
        let rows: [&[f32]; GROUP] = std::array::from_fn(|g| &seed[g * 200..][..n]);
        let mut want = seed[4 * 200..][..n].to_vec();
        for g in 0..GROUP {
            axpy(&mut want, c[g], rows[g]);
        }
        let mut got = seed[4 * 200..][..n].to_vec();
        axpy_group(&mut got, c, &rows);
        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        prop_assert_eq!(bits(&got), bits(&want));
    }
}
