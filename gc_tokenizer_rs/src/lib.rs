//! `gc_tokenizer_rs`: the Rust core of the `gc` tokeniser (GeneCompass corpus builder).
//!
//! * [`normalize`]: per-cell validation, column → token mapping, duplicate summing, library size;
//! * [`topk`]: the corpus gene order (`x / median` descending, token id ascending) and partial
//!   top-k selection;
//! * [`tokenize`]: tokenisation of one CSR chunk, in parallel and deterministic;
//! * [`medians`]: streaming, mergeable per-gene medians in bounded memory;
//! * [`error`]: typed errors carrying the cell (row within chunk), column and value.
//!
//! The crate has no Python dependency; the bindings (module `genecompass._rust`) live in
//! `python.rs` behind the `python` cargo feature, which maturin turns on.

pub mod error;
pub mod medians;
pub mod normalize;
pub mod tokenize;
pub mod topk;

#[cfg(feature = "python")]
mod python;

pub use error::{Error, ErrorKind, Result};
pub use medians::MedianAccumulator;
pub use normalize::{NormParams, NO_TOKEN};
pub use tokenize::{tokenize_chunk, ChunkStats, TokenizeParams, TokenizedChunk};

/// Version of this crate (exposed to Python as `genecompass._rust.__version__`).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
