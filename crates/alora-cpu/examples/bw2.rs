use std::time::Instant;
const L: usize = 32;
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; L];
    for (p, q) in a.chunks_exact(L).zip(b.chunks_exact(L)) { for k in 0..L { acc[k] += p[k] * q[k]; } }
    acc.iter().sum()
}
#[inline(always)]
fn dot_multi<const R: usize>(x: &[f32], rows: [&[f32]; R]) -> [f32; R] {
    let mut acc = [[0f32; L]; R];
    let n = x.len();
    for c in 0..n / L {
        let xc = &x[c * L..][..L];
        for r in 0..R { let rc = &rows[r][c * L..][..L]; for k in 0..L { acc[r][k] += rc[k] * xc[k]; } }
    }
    let mut out = [0f32; R];
    for r in 0..R { out[r] = acc[r].iter().sum(); }
    out
}
#[multiversion::multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
fn run(mode: u32, arena: &[f32], x: &[f32], out: &mut [f32], d: usize) {
    let rows = arena.len() / d;
    match mode {
        1 => for j in 0..rows { out[j % out.len()] += dot(&arena[j * d..][..d], x); },
        4 => for j in (0..rows).step_by(4) {
            let o = dot_multi::<4>(x, [&arena[j * d..][..d], &arena[(j + 1) * d..][..d], &arena[(j + 2) * d..][..d], &arena[(j + 3) * d..][..d]]);
            out[j % out.len()] += o[0] + o[1] + o[2] + o[3];
        },
        _ => for j in (0..rows).step_by(8) {
            let rr: [&[f32]; 8] = std::array::from_fn(|q| &arena[(j + q) * d..][..d]);
            let o = dot_multi::<8>(x, rr);
            out[j % out.len()] += o.iter().sum::<f32>();
        },
    }
}
fn main() {
    let d = 512;
    let arena: Vec<f32> = (0..64 << 20 >> 2).map(|i| (i % 7) as f32 * 0.1).collect();
    let x = vec![0.5f32; d];
    let mut out = vec![0f32; 16];
    for mode in [1, 4, 8, 1, 4, 8] {
        run(mode, &arena, &x, &mut out, d);
        let t = Instant::now();
        for _ in 0..3 { run(mode, &arena, &x, &mut out, d); }
        println!("mode {mode}: {:.1} GB/s", 3.0 * arena.len() as f64 * 4.0 / t.elapsed().as_secs_f64() / 1e9);
    }
    println!("{}", out[0]);
}
