//! The streaming reader: round trips, exactly-once by row id, binarisation, bounded footprint.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;

use common::{pixel, write_u8};
use elbo_datasets::{
    Batch, BatchStream, Binarize, Binarizer, Cursor, DataSchema, Dataset, DatasetWriter,
    LabeledSet, PixelSlice, PixelType, Rows, WriterSpec,
};

fn collect(
    ds: &Arc<Dataset>,
    world: u32,
    cursor: Cursor,
    bin: Binarizer,
    batch: u64,
    window: u64,
) -> Vec<Vec<Batch>> {
    let plan = ds.plan(11, batch, window, true).unwrap();
    (0..world)
        .map(|rank| {
            BatchStream::new(
                ds.clone(),
                plan.rank_plan(cursor, world, rank).unwrap(),
                bin,
                (rank % 3) as usize,
            )
            .collect::<Result<Vec<_>, _>>()
            .unwrap()
        })
        .collect()
}

/// A dataset of two files with uneven row groups: 23 rows in groups of 5, 17 rows in groups of 4.
fn two_files(dir: &std::path::Path) -> Arc<Dataset> {
    write_u8(&dir.join("a.parquet"), 0, 23, 6, 5);
    write_u8(&dir.join("b.parquet"), 100, 17, 6, 4);
    Arc::new(Dataset::open(dir.to_str().unwrap()).unwrap())
}

#[test]
fn dataset_opens_files_in_order_with_their_row_groups() {
    let dir = tempfile::tempdir().unwrap();
    let ds = two_files(dir.path());
    assert_eq!(ds.rows(), 40);
    assert_eq!(ds.files().len(), 2);
    let sizes: Vec<u64> = ds.chunks().iter().map(|c| c.rows).collect();
    assert_eq!(sizes, [5, 5, 5, 5, 3, 4, 4, 4, 4, 1]);
    let glob = format!("{}/*.parquet", dir.path().display());
    assert_eq!(Dataset::open(&glob).unwrap().rows(), 40);
}

#[test]
fn world_of_three_reads_every_row_once_with_its_values() {
    let dir = tempfile::tempdir().unwrap();
    let ds = two_files(dir.path());
    let ranks = collect(
        &ds,
        3,
        Cursor::start(0),
        Binarizer::new(Binarize::None, 0),
        8,
        16,
    );
    let mut seen = BTreeMap::new();
    for batches in &ranks {
        assert_eq!(batches.len(), 5, "ceil(40 / 8) steps on every rank");
        for b in batches {
            for (i, id) in b.ids.iter().enumerate() {
                *seen.entry(*id).or_insert(0) += 1;
                let row = &b.x[i * b.dim..(i + 1) * b.dim];
                let want: Vec<f32> = (0..6).map(|j| f32::from(pixel(*id, j)) / 255.0).collect();
                assert_eq!(row, &want[..], "values of id {id}");
                assert_eq!(b.labels[i], (id % 5 != 4).then_some((id % 3) as i64));
            }
        }
    }
    let ids: Vec<u64> = seen.keys().copied().collect();
    let want: Vec<u64> = (0..23).chain(100..117).collect();
    assert_eq!(ids, want);
    assert!(seen.values().all(|n| *n == 1));
}

#[test]
fn float32_examples_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("f.parquet");
    let spec = WriterSpec {
        schema: DataSchema {
            shape: vec![2, 2],
            dim: 4,
            pixel: PixelType::Float32,
            has_label: false,
            has_id: false,
        },
        extra_columns: vec![],
        row_group_size: 3,
    };
    let mut w = DatasetWriter::create(&path, spec).unwrap();
    let x: Vec<f32> = (0..40).map(|i| i as f32 * -0.5).collect();
    w.write(Rows {
        x: PixelSlice::Float32(&x),
        labels: None,
        ids: None,
        extra: &[],
    })
    .unwrap();
    w.finish().unwrap();
    let ds = Arc::new(Dataset::open(path.to_str().unwrap()).unwrap());
    assert_eq!(ds.schema().shape, [2, 2]);
    let batches = collect(
        &ds,
        1,
        Cursor::start(0),
        Binarizer::new(Binarize::None, 0),
        4,
        4,
    )
    .remove(0);
    let mut rows: Vec<(u64, Vec<f32>)> = batches
        .iter()
        .flat_map(|b| {
            b.ids
                .iter()
                .enumerate()
                .map(|(i, id)| (*id, b.x[i * 4..i * 4 + 4].to_vec()))
        })
        .collect();
    rows.sort_by_key(|r| r.0);
    for (k, (id, v)) in rows.iter().enumerate() {
        assert_eq!(
            *id, k as u64,
            "derived ids are file index << 40 | position; file 0"
        );
        assert_eq!(v, &x[k * 4..k * 4 + 4]);
    }
}

fn by_id(ranks: &[Vec<Batch>]) -> BTreeMap<u64, Vec<f32>> {
    ranks
        .iter()
        .flatten()
        .flat_map(|b| {
            b.ids
                .iter()
                .enumerate()
                .map(|(i, id)| (*id, b.x[i * b.dim..(i + 1) * b.dim].to_vec()))
        })
        .collect()
}

#[test]
fn dynamic_binarisation_is_reproducible_and_resampled_each_epoch() {
    let dir = tempfile::tempdir().unwrap();
    write_u8(&dir.path().join("a.parquet"), 0, 64, 200, 16);
    let ds = Arc::new(Dataset::open(dir.path().to_str().unwrap()).unwrap());
    let bin = Binarizer::new(Binarize::Dynamic, 5);
    let e0 = by_id(&collect(&ds, 1, Cursor::start(0), bin, 8, 16));
    let e0_world4 = by_id(&collect(&ds, 4, Cursor::start(0), bin, 8, 16));
    let e0_resumed = by_id(&collect(&ds, 1, Cursor { epoch: 0, step: 3 }, bin, 8, 16));
    let e1 = by_id(&collect(&ds, 1, Cursor::start(1), bin, 8, 16));
    assert!(e0.values().flatten().all(|v| *v == 0.0 || *v == 1.0));
    assert_eq!(e0, e0_world4, "the same draws at any world size");
    for (id, v) in &e0_resumed {
        assert_eq!(&e0[id], v, "the same draws after a resume");
    }
    assert_ne!(e0, e1, "fresh draws each epoch");
    // The mean of the draws follows the intensities: pixels are (7 id + 3 j) mod 256 / 255.
    let (mut sum, mut want) = (0.0, 0.0);
    for (id, v) in &e0 {
        sum += v.iter().sum::<f32>();
        want += (0..200)
            .map(|j| f32::from(pixel(*id, j)) / 255.0)
            .sum::<f32>();
    }
    assert!(
        (sum - want).abs() / want < 0.02,
        "mean draw {sum} vs intensity {want}"
    );
    let stat = Binarizer::new(Binarize::Static, 5);
    let s0 = by_id(&collect(&ds, 1, Cursor::start(0), stat, 8, 16));
    let s1 = by_id(&collect(&ds, 2, Cursor::start(1), stat, 8, 16));
    assert_eq!(s0, s1, "static binarisation is fixed for the run");
}

#[test]
fn footprint_is_bounded_by_the_shuffle_window() {
    let dir = tempfile::tempdir().unwrap();
    // 1,000 rows in row groups of 10; window 40 rows: at most 40/10 + 2 chunks decoded for the
    // window, plus 2 per decoder thread decoded ahead.
    write_u8(&dir.path().join("a.parquet"), 0, 1000, 4, 10);
    let ds = Arc::new(Dataset::open(dir.path().to_str().unwrap()).unwrap());
    let plan = ds.plan(1, 8, 40, true).unwrap();
    for threads in [0, 1, 2] {
        let mut stream = BatchStream::new(
            ds.clone(),
            plan.plan(0, 1, 0).unwrap(),
            Binarizer::new(Binarize::None, 0),
            threads,
        );
        let mut max_held = 0;
        let mut rows = 0;
        while let Some(b) = stream.next() {
            rows += b.unwrap().rows();
            max_held = max_held.max(stream.held_chunks());
        }
        assert_eq!(rows, 1000);
        assert!(
            max_held <= 6 + 2 * threads,
            "held {max_held} chunks at once with {threads} threads"
        );
    }
}

#[test]
fn decoder_threads_do_not_change_the_batches() {
    let dir = tempfile::tempdir().unwrap();
    let ds = two_files(dir.path());
    let plan = ds.plan(3, 4, 12, true).unwrap();
    let bin = Binarizer::new(Binarize::Dynamic, 2);
    let run = |threads| {
        BatchStream::new(ds.clone(), plan.plan(0, 2, 1).unwrap(), bin, threads)
            .collect::<Result<Vec<_>, _>>()
            .unwrap()
    };
    assert_eq!(run(0), run(3));
}

#[test]
fn stream_resumes_with_the_same_batches() {
    let dir = tempfile::tempdir().unwrap();
    let ds = two_files(dir.path());
    let bin = Binarizer::new(Binarize::Dynamic, 1);
    let full = collect(&ds, 2, Cursor::start(2), bin, 4, 12);
    let cursor = full[0][4].cursor_after;
    assert_eq!(cursor, Cursor { epoch: 2, step: 5 });
    let resumed = collect(&ds, 2, cursor, bin, 4, 12);
    for rank in 0..2 {
        assert_eq!(resumed[rank][..], full[rank][5..]);
    }
}

/// The labels of the rows that have one, by id.
fn labeled_rows(ds: &Dataset) -> BTreeMap<u64, i64> {
    let mut out = BTreeMap::new();
    for c in ds.chunks() {
        let d = elbo_datasets::read_chunk(ds, c).unwrap();
        for (id, label) in d.ids.iter().zip(&d.labels) {
            if let Some(l) = label {
                out.insert(*id, *l);
            }
        }
    }
    out
}

#[test]
fn a_labeled_set_keeps_n_rows_per_class_whatever_the_world_and_the_rest_lose_their_labels() {
    let dir = tempfile::tempdir().unwrap();
    let ds = two_files(dir.path());
    let truth = labeled_rows(&ds);
    let set = LabeledSet::select(&ds, 3, 5).unwrap();
    assert_eq!(set.len(), 9);
    assert_eq!(set.per_class(), BTreeMap::from([(0, 3), (1, 3), (2, 3)]));
    assert_eq!(
        LabeledSet::select(&ds, 3, 5)
            .unwrap()
            .rows()
            .collect::<Vec<_>>(),
        set.rows().collect::<Vec<_>>(),
        "the same seed keeps the same rows"
    );
    let other: Vec<_> = LabeledSet::select(&ds, 3, 6).unwrap().rows().collect();
    assert_ne!(
        other,
        set.rows().collect::<Vec<_>>(),
        "another seed, others"
    );
    assert_eq!(
        LabeledSet::select(&ds, 0, 5).unwrap().len(),
        truth.len(),
        "0 keeps every label"
    );
    let err = LabeledSet::select(&ds, 20, 5).unwrap_err().to_string();
    assert!(
        err.contains("20 labeled rows per class asked for, but class"),
        "{err}"
    );

    let plan = ds
        .plan(11, 8, 8, true)
        .unwrap()
        .with_labeled(Arc::new(set.clone()), 0)
        .unwrap();
    let mut kept = BTreeMap::new();
    for rank in 0..2 {
        for b in BatchStream::new(
            ds.clone(),
            plan.plan(0, 2, rank).unwrap(),
            Binarizer::new(Binarize::None, 0),
            1,
        ) {
            let b = b.unwrap();
            for (id, label) in b.ids.iter().zip(&b.labels) {
                if let Some(l) = label {
                    assert_eq!(truth[id], *l, "a kept label is the row's own");
                    kept.insert(*id, *l);
                }
            }
        }
    }
    assert_eq!(kept.len(), 9, "only the kept rows show labels");
}

#[test]
fn composed_batches_carry_labeled_rows_with_their_values_beside_unlabeled_ones() {
    let dir = tempfile::tempdir().unwrap();
    let ds = two_files(dir.path());
    let truth = labeled_rows(&ds);
    let mut set = LabeledSet::select(&ds, 2, 1).unwrap();
    let plan = ds.plan(11, 6, 12, true).unwrap();
    let unloaded = plan.clone().with_labeled(Arc::new(set.clone()), 3).unwrap();
    let err = BatchStream::new(
        ds.clone(),
        unloaded.plan(0, 1, 0).unwrap(),
        Binarizer::new(Binarize::None, 0),
        0,
    )
    .next()
    .unwrap()
    .unwrap_err()
    .to_string();
    assert!(err.contains("not loaded"), "{err}");
    set.load(&ds).unwrap();
    let plan = plan.with_labeled(Arc::new(set.clone()), 3).unwrap();
    let mut labeled_seen = BTreeMap::new();
    let mut unlabeled_ids = Vec::new();
    for b in BatchStream::new(
        ds.clone(),
        plan.plan(0, 1, 0).unwrap(),
        Binarizer::new(Binarize::None, 0),
        1,
    ) {
        let b = b.unwrap();
        assert_eq!(b.rows() as u64, b.global_rows);
        let split = b.rows() - 3;
        assert!(
            b.labels[..split].iter().all(Option::is_none),
            "the global order's rows are unlabeled"
        );
        for (i, (id, label)) in b.ids.iter().zip(&b.labels).enumerate().skip(split) {
            let label = label.expect("the last 3 rows are labeled");
            assert_eq!(truth[id], label);
            for j in 0..6 {
                assert_eq!(
                    b.x[i * 6 + j],
                    f32::from(common::pixel(*id, j)) / 255.0,
                    "values of id {id}"
                );
            }
            *labeled_seen.entry(*id).or_insert(0) += 1;
        }
        unlabeled_ids.extend_from_slice(&b.ids[..split]);
    }
    unlabeled_ids.sort_unstable();
    unlabeled_ids.dedup();
    assert_eq!(unlabeled_ids.len(), 40, "every row once, as unlabeled");
    assert_eq!(labeled_seen.len(), 6, "the 6 labeled rows cycle");
}

#[test]
fn a_labeled_row_is_binarised_afresh_on_every_pass_over_the_set() {
    let dir = tempfile::tempdir().unwrap();
    let ds = two_files(dir.path());
    let mut set = LabeledSet::select(&ds, 3, 3).unwrap();
    set.load(&ds).unwrap();
    // 9 kept rows, 9 a batch: every step is one pass over the set.
    let plan = ds
        .plan(11, 4, 8, true)
        .unwrap()
        .with_labeled(Arc::new(set), 9)
        .unwrap();
    let mut draws: BTreeMap<u64, Vec<Vec<f32>>> = BTreeMap::new();
    let dynamic = Binarizer::new(Binarize::Dynamic, 9);
    for b in BatchStream::new(ds.clone(), plan.plan(0, 1, 0).unwrap(), dynamic, 0) {
        let b = b.unwrap();
        for (i, id) in b.ids.iter().enumerate().skip(b.rows() - 9) {
            draws
                .entry(*id)
                .or_default()
                .push(b.x[i * 6..(i + 1) * 6].to_vec());
        }
    }
    let mut uncertain = 0;
    for (id, seen) in draws {
        assert!(seen.len() > 2, "id {id} is in every batch");
        // Only pixels far from 0 and 1 are likely to come out differently.
        if (0..6).any(|j| (77..=178).contains(&common::pixel(id, j))) {
            uncertain += 1;
            assert!(
                seen.windows(2).any(|w| w[0] != w[1]),
                "id {id}: a fresh draw on every pass, not one an epoch"
            );
        }
    }
    assert!(uncertain > 0, "some kept row has grey pixels");
}
