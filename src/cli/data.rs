//! `elbo data …`: convert, make-sprites, inspect.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use clap::{Subcommand, ValueEnum};
use elbo_datasets::convert::{
    convert_csv, convert_idx, convert_npy, ConvertSummary, CsvHeader, CsvOptions,
};
use elbo_datasets::sprites::{make_sprites, SpritesParams};
use elbo_datasets::{inspect, join_shape, parse_shape, Dataset, PixelType, DEFAULT_ROW_GROUP_SIZE};

#[derive(Debug, Subcommand)]
pub enum DataCommand {
    /// Convert IDX (MNIST), CSV or NPY files to an elbo Parquet dataset.
    Convert(ConvertArgs),
    /// Generate the procedural sprites set (train.parquet and test.parquet).
    MakeSprites(SpritesArgs),
    /// Summarise a dataset: schema, rows, row groups, labels, value range.
    Inspect {
        /// A Parquet file, a directory of them, or a glob.
        path: String,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Format {
    Idx,
    Csv,
    Npy,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Header {
    Auto,
    Yes,
    No,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum PixelArg {
    Uint8,
    Float32,
}

#[derive(Debug, clap::Args)]
pub struct ConvertArgs {
    /// Input format.
    #[arg(long)]
    format: Format,
    /// Images: an IDX images file, a CSV file, or an (N, …) .npy array (plain or .gz for IDX/CSV).
    #[arg(long, visible_alias = "input", value_name = "FILE")]
    images: PathBuf,
    /// Labels: an IDX labels file or an (N,) .npy array (CSV keeps labels in a column).
    #[arg(long, value_name = "FILE")]
    labels: Option<PathBuf>,
    /// Output Parquet file (written atomically).
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
    /// Rows per row group (the unit of sharding across workers).
    #[arg(long, default_value_t = DEFAULT_ROW_GROUP_SIZE)]
    row_group_size: usize,
    /// CSV: the label column, by header name or 0-based index (default: a column named `label`).
    #[arg(long)]
    label_column: Option<String>,
    /// CSV: whether the first line is a header.
    #[arg(long, value_enum, default_value_t = Header::Auto)]
    header: Header,
    /// CSV: element type of the pixel columns.
    #[arg(long, value_enum, default_value_t = PixelArg::Uint8)]
    pixel_type: PixelArg,
    /// CSV/NPY: example shape, e.g. 1,28,28 (default: flat for CSV, the array's shape for NPY).
    #[arg(long)]
    shape: Option<String>,
}

#[derive(Debug, clap::Args)]
pub struct SpritesArgs {
    /// Output directory.
    #[arg(long)]
    out: PathBuf,
    /// Training images (the test split gets a tenth as many).
    #[arg(long, default_value_t = 20_000)]
    n: u64,
    /// Generator seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Image side in pixels: 32 or 64.
    #[arg(long, default_value_t = 64)]
    size: u32,
    /// Rows per row group.
    #[arg(long, default_value_t = DEFAULT_ROW_GROUP_SIZE)]
    row_group_size: usize,
}

pub fn run(cmd: DataCommand) -> anyhow::Result<()> {
    match cmd {
        DataCommand::Convert(args) => convert(args),
        DataCommand::MakeSprites(args) => {
            if args.row_group_size == 0 {
                bad!("--row-group-size must be at least 1");
            }
            let start = Instant::now();
            let params = SpritesParams {
                n: args.n,
                size: args.size,
                seed: args.seed,
            };
            let (train, test) = make_sprites(&args.out, &params, args.row_group_size)
                .with_context(|| format!("cannot make sprites in {}", args.out.display()))?;
            println!(
                "wrote {train} training and {test} test sprites ({0}×{0}) to {1} in {2:.1} s",
                args.size,
                args.out.display(),
                start.elapsed().as_secs_f64()
            );
            Ok(())
        }
        DataCommand::Inspect { path, json } => {
            let ds = Dataset::open(&path)?;
            let report = inspect(&ds)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                println!("dataset     {}", report.path);
                println!("files       {}", report.files);
                println!("rows        {}", report.rows);
                println!("row groups  {}", report.row_groups);
                println!(
                    "shape       {} ({:?})",
                    join_shape(&report.shape),
                    report.pixel_type
                );
                println!(
                    "row ids     {}",
                    if report.has_id {
                        "stored"
                    } else {
                        "derived from file and position"
                    }
                );
                println!("labeled     {}", report.labeled);
                println!("unlabeled   {}", report.unlabeled);
                if !report.label_histogram.is_empty() {
                    let hist: Vec<String> = report
                        .label_histogram
                        .iter()
                        .map(|(l, n)| format!("{l}:{n}"))
                        .collect();
                    println!("labels      {}", hist.join(" "));
                }
                println!("x range     [{}, {}]", report.x_min, report.x_max);
            }
            Ok(())
        }
    }
}

fn convert(args: ConvertArgs) -> anyhow::Result<()> {
    if args.row_group_size == 0 {
        bad!("--row-group-size must be at least 1");
    }
    let csv_only = args.label_column.is_some()
        || !matches!(args.header, Header::Auto)
        || !matches!(args.pixel_type, PixelArg::Uint8);
    if csv_only && !matches!(args.format, Format::Csv) {
        bad!("--label-column, --header and --pixel-type apply to --format csv only");
    }
    let shape = match &args.shape {
        None => None,
        Some(text) => Some(parse_shape(text).with_context(|| {
            format!(
                "--shape {text:?}: expected positive integers separated by commas, e.g. 1,28,28"
            )
        })?),
    };
    let start = Instant::now();
    let summary: ConvertSummary = match args.format {
        Format::Idx => {
            if shape.is_some() {
                bad!("--shape does not apply to --format idx: IDX files carry their own shape");
            }
            convert_idx(
                &args.images,
                args.labels.as_deref(),
                &args.out,
                args.row_group_size,
            )?
        }
        Format::Csv => {
            if args.labels.is_some() {
                bad!("--labels does not apply to --format csv: name the label column with --label-column");
            }
            let opts = CsvOptions {
                header: match args.header {
                    Header::Auto => CsvHeader::Auto,
                    Header::Yes => CsvHeader::Yes,
                    Header::No => CsvHeader::No,
                },
                label_column: args.label_column.clone(),
                pixel: match args.pixel_type {
                    PixelArg::Uint8 => PixelType::Uint8,
                    PixelArg::Float32 => PixelType::Float32,
                },
                shape,
                row_group_size: args.row_group_size,
            };
            convert_csv(&args.images, &args.out, &opts)?
        }
        Format::Npy => convert_npy(
            &args.images,
            args.labels.as_deref(),
            &args.out,
            shape.as_deref(),
            args.row_group_size,
        )?,
    };
    println!(
        "wrote {} rows of shape {} ({} labeled) to {} in {:.2} s",
        summary.rows,
        join_shape(&summary.shape),
        summary.labeled,
        args.out.display(),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}
