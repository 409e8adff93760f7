//! Typed errors of the tokeniser core.
//!
//! Every variant that concerns the data carries the cell index *within the chunk* (the row number
//! of the chunk's CSR matrix) and, where there is one, the column and the offending value. The
//! Python front adds the file name and the chunk's first row, so it can point at the exact cell.
//! Each variant belongs to one [`ErrorKind`]; the bindings map each kind to one exception class.

use thiserror::Error;

/// Coarse class of an error; the Python bindings raise one exception class per kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// A count is negative, NaN, infinite, or non-integer where integers are required.
    InvalidCount,
    /// The CSR structure is broken: `indptr`, `indices` or array lengths.
    MalformedMatrix,
    /// An argument that is not matrix data is unusable (gene map, medians, `top_k`, ...).
    InvalidArgument,
    /// The rayon thread pool could not be built.
    ThreadPool,
}

/// Errors of the tokeniser core.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum Error {
    #[error("cell {cell} (row within chunk), column {column}: count {value} is negative")]
    NegativeCount {
        cell: usize,
        column: u32,
        value: f32,
    },

    #[error("cell {cell} (row within chunk), column {column}: count {value} is not finite")]
    NonFiniteCount {
        cell: usize,
        column: u32,
        value: f32,
    },

    #[error(
        "cell {cell} (row within chunk), column {column}: count {value} is not an integer \
         (raw counts are expected; allow non-integer values to tokenise normalised data)"
    )]
    NonIntegerCount {
        cell: usize,
        column: u32,
        value: f32,
    },

    #[error(
        "cell {cell} (row within chunk): column index {column} is out of range \
         (the gene map has {n_columns} columns)"
    )]
    ColumnOutOfRange {
        cell: usize,
        column: u32,
        n_columns: usize,
    },

    #[error(
        "cell {cell} (row within chunk): malformed indptr, row spans [{start}, {end}) relative to \
         indptr[0] but the chunk has {nnz} stored entries"
    )]
    MalformedIndptr {
        cell: usize,
        start: i64,
        end: i64,
        nnz: usize,
    },

    #[error("malformed matrix: indptr is empty (it needs n_cells + 1 >= 1 entries)")]
    EmptyIndptr,

    #[error("malformed matrix: indices has {indices} entries but data has {data}")]
    LengthMismatch { indices: usize, data: usize },

    #[error(
        "gene map: column {column} maps to token {token}, outside the vocabulary of {vocab_size} tokens"
    )]
    TokenOutOfRange {
        column: usize,
        token: u32,
        vocab_size: usize,
    },

    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    #[error("could not build a thread pool with {n_threads} threads: {message}")]
    ThreadPool { n_threads: usize, message: String },
}

impl Error {
    /// The kind of this error (one Python exception class per kind).
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::NegativeCount { .. }
            | Error::NonFiniteCount { .. }
            | Error::NonIntegerCount { .. } => ErrorKind::InvalidCount,
            Error::ColumnOutOfRange { .. }
            | Error::MalformedIndptr { .. }
            | Error::EmptyIndptr
            | Error::LengthMismatch { .. } => ErrorKind::MalformedMatrix,
            Error::TokenOutOfRange { .. } | Error::InvalidArgument(_) => ErrorKind::InvalidArgument,
            Error::ThreadPool { .. } => ErrorKind::ThreadPool,
        }
    }

    /// The cell (row within the chunk) the error is about, if it concerns one cell.
    pub fn cell(&self) -> Option<usize> {
        match self {
            Error::NegativeCount { cell, .. }
            | Error::NonFiniteCount { cell, .. }
            | Error::NonIntegerCount { cell, .. }
            | Error::ColumnOutOfRange { cell, .. }
            | Error::MalformedIndptr { cell, .. } => Some(*cell),
            _ => None,
        }
    }

    /// The input column the error is about, if any.
    pub fn column(&self) -> Option<u32> {
        match self {
            Error::NegativeCount { column, .. }
            | Error::NonFiniteCount { column, .. }
            | Error::NonIntegerCount { column, .. }
            | Error::ColumnOutOfRange { column, .. } => Some(*column),
            Error::TokenOutOfRange { column, .. } => u32::try_from(*column).ok(),
            _ => None,
        }
    }
}

/// Result alias of the tokeniser core.
pub type Result<T> = std::result::Result<T, Error>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_names_cell_column_and_value() {
        let e = Error::NegativeCount {
            cell: 17,
            column: 512,
            value: -3.0,
        };
        assert_eq!(
            e.to_string(),
            "cell 17 (row within chunk), column 512: count -3 is negative"
        );
        assert_eq!(e.kind(), ErrorKind::InvalidCount);
        assert_eq!(e.cell(), Some(17));
        assert_eq!(e.column(), Some(512));
    }

    #[test]
    fn kinds() {
        assert_eq!(Error::EmptyIndptr.kind(), ErrorKind::MalformedMatrix);
        assert_eq!(
            Error::ColumnOutOfRange {
                cell: 0,
                column: 9,
                n_columns: 3
            }
            .kind(),
            ErrorKind::MalformedMatrix
        );
        assert_eq!(
            Error::InvalidArgument("x".into()).kind(),
            ErrorKind::InvalidArgument
        );
        assert_eq!(Error::EmptyIndptr.cell(), None);
    }
}
