//! Chunk-boundary independence: tokenising rows 0..n as one chunk or as several consecutive
//! chunks (each passed with its own slice of indptr, indices and data, as the Python reader
//! does) gives concatenated-identical output; the median pass is likewise chunking-invariant.

use gc_tokenizer_rs::{
    tokenize_chunk, Error, MedianAccumulator, NormParams, TokenizeParams, TokenizedChunk, NO_TOKEN,
};

/// Tiny deterministic PRNG (splitmix64).
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        (z ^ (z >> 31)) % n
    }
}

/// A whole "file": CSR matrix of integer counts plus gene map (with duplicates and unmapped
/// columns). Rows are unsorted within themselves, some are empty.
struct Matrix {
    indptr: Vec<i64>,
    indices: Vec<u32>,
    data: Vec<f32>,
    col_token: Vec<u32>,
    vocab: usize,
}

fn matrix(seed: u64, n_cells: usize) -> Matrix {
    let mut rng = Rng(seed);
    let (n_cols, vocab) = (400usize, 300usize);
    let mut indptr = vec![0i64];
    let (mut indices, mut data) = (Vec::new(), Vec::new());
    for _ in 0..n_cells {
        let nnz = rng.below(150) as usize;
        let mut seen = vec![false; n_cols];
        for _ in 0..nnz {
            let c = rng.below(n_cols as u64) as usize;
            if std::mem::replace(&mut seen[c], true) {
                continue;
            }
            indices.push(c as u32);
            data.push(match rng.below(8) {
                0 => 0.0,
                1 => rng.below(300) as f32,
                _ => (1 + rng.below(5)) as f32,
            });
        }
        indptr.push(indices.len() as i64);
    }
    let col_token = (0..n_cols)
        .map(|c| {
            if c % 17 == 3 {
                NO_TOKEN
            } else {
                (c % vocab) as u32
            }
        })
        .collect();
    Matrix {
        indptr,
        indices,
        data,
        col_token,
        vocab,
    }
}

/// Borrowed rows `a..b` of `m`, as a reader hands a chunk over: indptr keeps its absolute base.
fn rows(m: &Matrix, a: usize, b: usize) -> (&[i64], &[u32], &[f32]) {
    let (s, e) = (m.indptr[a] as usize, m.indptr[b] as usize);
    (&m.indptr[a..=b], &m.indices[s..e], &m.data[s..e])
}

fn concat(parts: &[TokenizedChunk]) -> TokenizedChunk {
    let mut out = TokenizedChunk {
        offsets: vec![0],
        ..TokenizedChunk::default()
    };
    for p in parts {
        let base = *out.offsets.last().unwrap();
        out.offsets.extend(p.offsets[1..].iter().map(|o| o + base));
        out.genes.extend_from_slice(&p.genes);
        out.values.extend_from_slice(&p.values);
        out.n_expressed.extend_from_slice(&p.n_expressed);
        out.stats.n_dropped_no_median += p.stats.n_dropped_no_median;
    }
    out
}

fn params(library_size: bool, n_threads: usize) -> TokenizeParams {
    TokenizeParams {
        top_k: 24,
        norm: NormParams {
            library_size,
            target_sum: 1e4,
            allow_non_integer: false,
        },
        n_threads,
    }
}

#[test]
fn chunk_boundaries_do_not_change_tokens() {
    let n = 1500;
    let m = matrix(2024, n);
    // Medians from the median pass itself (some tokens never seen -> NaN -> dropped).
    for library_size in [true, false] {
        let mut acc = MedianAccumulator::new(m.vocab + 10, library_size, 1e4);
        let (ip, ix, d) = rows(&m, 0, n);
        acc.add_chunk(ip, ix, d, &m.col_token, 2, false).unwrap();
        let medians = acc.medians();
        assert!(medians.iter().any(|v| v.is_nan()));

        let whole =
            tokenize_chunk(ip, ix, d, &m.col_token, &medians, &params(library_size, 2)).unwrap();
        assert_eq!(whole.offsets.len(), n + 1);
        assert!(!whole.genes.is_empty());

        for cuts in [
            vec![0, 700, n],
            vec![0, 1, 256, 257, 999, n],
            vec![0, n - 1, n],
        ] {
            let parts: Vec<TokenizedChunk> = cuts
                .windows(2)
                .map(|w| {
                    let (ip, ix, d) = rows(&m, w[0], w[1]);
                    tokenize_chunk(ip, ix, d, &m.col_token, &medians, &params(library_size, 1))
                        .unwrap()
                })
                .collect();
            let joined = concat(&parts);
            assert_eq!(joined, whole, "cuts {cuts:?}");
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&joined.values), bits(&whole.values));
        }
    }
}

#[test]
fn chunk_boundaries_do_not_change_medians() {
    let n = 1200;
    let m = matrix(7, n);
    let (ip, ix, d) = rows(&m, 0, n);
    let mut whole = MedianAccumulator::new(m.vocab, true, 1e4);
    whole.add_chunk(ip, ix, d, &m.col_token, 1, false).unwrap();

    let mut streamed = MedianAccumulator::new(m.vocab, true, 1e4);
    for w in [0, 100, 101, 640, n].windows(2) {
        let (ip, ix, d) = rows(&m, w[0], w[1]);
        streamed
            .add_chunk(ip, ix, d, &m.col_token, 3, false)
            .unwrap();
    }
    assert_eq!(streamed, whole);
    let bits = |v: Vec<f32>| v.into_iter().map(f32::to_bits).collect::<Vec<_>>();
    assert_eq!(bits(streamed.medians()), bits(whole.medians()));
    assert_eq!(streamed.n_nonzero(), whole.n_nonzero());
}

#[test]
fn errors_are_reported_relative_to_the_chunk() {
    let n = 600;
    let mut m = matrix(11, n);
    // Poison the first entry of row 450 (make sure the row is non-empty).
    let row = (450..n).find(|&i| m.indptr[i + 1] > m.indptr[i]).unwrap();
    let pos = m.indptr[row] as usize;
    m.data[pos] = -4.0;
    let medians = vec![1.0f32; m.vocab];
    let (ip, ix, d) = rows(&m, 400, n);
    let e = tokenize_chunk(ip, ix, d, &m.col_token, &medians, &params(true, 2)).unwrap_err();
    assert_eq!(
        e,
        Error::NegativeCount {
            cell: row - 400,
            column: m.indices[pos],
            value: -4.0
        }
    );
}
