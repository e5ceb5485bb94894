//! The data layer of elbo: the Parquet dataset format, a streaming reader with a bounded
//! footprint, the data plan that deals rows to ranks exactly once per epoch, converters from
//! IDX/CSV/NPY, and the built-in procedural sprites set. Knows nothing of models.

mod binarize;
mod chunk_reader;
pub mod convert;
mod dataset;
mod error;
mod format;
mod fsutil;
mod inspect;
mod labeled;
mod plan;
mod prefetch;
mod seed;
mod source;
pub mod sprites;
mod stream;
mod writer;

pub use binarize::{Binarize, Binarizer};
pub use chunk_reader::{read_chunk, read_labels, ChunkData, Pixels, DERIVED_ID_ROW_BITS};
pub use dataset::{Chunk, DataFile, Dataset};
pub use error::{DataError, Result};
pub use format::{
    checked_numel, join_shape, parse_shape, DataSchema, PixelType, ID_COLUMN, LABEL_COLUMN,
    MAX_EXAMPLE_VALUES, SHAPE_KEY, X_COLUMN,
};
pub use inspect::{inspect, label_counts, Inspection, LabelCounts};
pub use labeled::LabeledSet;
pub use plan::{share, Cursor, DataPlan, EpochOrder, LabelPlan, PlannedBatch, RankPlan, RowRef};
pub use seed::derive_seed;
pub use stream::{Batch, BatchStream};
pub use writer::{DatasetWriter, PixelSlice, Rows, WriterSpec, DEFAULT_ROW_GROUP_SIZE};

impl Dataset {
    /// A data plan over this dataset's chunks.
    pub fn plan(
        &self,
        seed: u64,
        batch_size: u64,
        shuffle_window: u64,
        shuffle: bool,
    ) -> Result<DataPlan> {
        DataPlan::new(
            self.chunks().iter().map(|c| c.rows).collect(),
            seed,
            batch_size,
            shuffle_window,
            shuffle,
        )
    }
}
