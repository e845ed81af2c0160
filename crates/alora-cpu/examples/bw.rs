use alora_cpu::*;
use std::time::Instant;
fn main() {
    let (n, r, d, calls) = (16usize, 16usize, 512usize, 128usize);
    let arena: Vec<f32> = (0..calls * 2 * n * r * d).map(|i| (i % 7) as f32 * 0.1).collect();
    let x = vec![0.5f32; n * d];
    let mut y = vec![0f32; n * d];
    let tok: Vec<i64> = (0..n as i64).collect();
    let ss: Vec<i64> = (0..=n as i64).collect();
    let rs: Vec<i64> = (0..=n as i64).map(|v| v * r as i64).collect();
    let rows: Vec<i64> = (0..(n * r) as i64).collect();
    let scale = vec![1f32; n];
    let seg = Segments { token_idx: &tok, seg_start: &ss, seg_row_start: &rs, rows: &rows, bt_rows: &rows, seg_scale: &scale };
    let mut y1 = vec![0f32; n];
    for mode in ["both", "shrink", "both", "shrink"] {
        let t = Instant::now();
        for _ in 0..3 {
            for i in 0..calls {
                let a = RowPool { offset: 2 * i * n * r * d, stride: d, width: d };
                let w = if mode == "both" { d } else { 1 };
                let bt = RowPool { offset: (2 * i + 1) * n * r * d, stride: d, width: w };
                let yy = if mode == "both" { &mut y[..] } else { &mut y1[..] };
                add_lora(yy, &x, &arena, a, &arena, bt, &seg).unwrap();
            }
        }
        let dt = t.elapsed().as_secs_f64() / 3.0;
        let bytes = if mode == "shrink" { calls * n * r * d * 4 } else { calls * 2 * n * r * d * 4 };
        println!("{mode}: {:.1} GB/s {:.1} us/call", bytes as f64 / dt / 1e9, dt / calls as f64 * 1e6);
    }
    println!("{}", y[0] + y1[0]);
}
