//! Times the Rust core on a CSR chunk dumped to raw little-endian files (a profiling aid).
//! Usage: cargo run --release --example hot -- DIR [tokenize|medians] [threads] [repeats]
use std::time::Instant;

use gc_tokenizer_rs::{tokenize_chunk, MedianAccumulator, NormParams, TokenizeParams};

fn read<T: Copy + Default>(path: &str) -> Vec<T> {
    let bytes = std::fs::read(path).unwrap();
    let n = bytes.len() / std::mem::size_of::<T>();
    let mut out = vec![T::default(); n];
    unsafe {
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), out.as_mut_ptr() as *mut u8, bytes.len());
    }
    out
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let dir = &args[1];
    let what = args.get(2).map_or("tokenize", String::as_str);
    let threads: usize = args.get(3).map_or(1, |s| s.parse().unwrap());
    let repeats: usize = args.get(4).map_or(3, |s| s.parse().unwrap());
    let indptr: Vec<i64> = read(&format!("{dir}/indptr.bin"));
    let indices: Vec<u32> = read(&format!("{dir}/indices.bin"));
    let data: Vec<f32> = read(&format!("{dir}/data.bin"));
    let col_token: Vec<u32> = read(&format!("{dir}/col_token.bin"));
    let medians: Vec<f32> = read(&format!("{dir}/medians.bin"));
    for _ in 0..repeats {
        let start = Instant::now();
        let n = if what == "tokenize" {
            let params = TokenizeParams {
                top_k: 2048,
                norm: NormParams {
                    library_size: true,
                    target_sum: 1e4,
                    allow_non_integer: false,
                },
                n_threads: threads,
            };
            tokenize_chunk(&indptr, &indices, &data, &col_token, &medians, &params)
                .unwrap()
                .genes
                .len()
        } else {
            let mut acc = MedianAccumulator::new(medians.len(), true, 1e4);
            acc.add_chunk(&indptr, &indices, &data, &col_token, threads, false)
                .unwrap();
            acc.medians().len()
        };
        println!("{what}: {:.3} s ({n})", start.elapsed().as_secs_f64());
    }
}
