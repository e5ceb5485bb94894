//! Property tests of the data plan: exactly once per epoch, exact resume, re-dealing.

use std::collections::BTreeMap;
use std::sync::Arc;

use elbo_datasets::{share, Cursor, DataPlan, LabeledSet, PlannedBatch, RowRef};
use proptest::prelude::*;

/// Every (step, rank) batch of one epoch from `cursor`, as rank → list of batches.
fn run(plan: &DataPlan, cursor: Cursor, world: u32) -> Vec<Vec<Vec<RowRef>>> {
    (0..world)
        .map(|rank| {
            plan.rank_plan(cursor, world, rank)
                .unwrap()
                .map(|b| b.rows)
                .collect()
        })
        .collect()
}

/// All rows of every step from `cursor`, in step order (ranks concatenated in rank order).
fn flat(plan: &DataPlan, cursor: Cursor, world: u32) -> Vec<RowRef> {
    let per_rank = run(plan, cursor, world);
    let steps = per_rank[0].len();
    assert!(
        per_rank.iter().all(|r| r.len() == steps),
        "every rank takes the same number of steps"
    );
    (0..steps)
        .flat_map(|s| per_rank.iter().flat_map(move |r| r[s].clone()))
        .collect()
}

fn all_rows(chunks: &[u64]) -> Vec<RowRef> {
    chunks
        .iter()
        .enumerate()
        .flat_map(|(c, n)| {
            (0..*n as u32).map(move |row| RowRef {
                chunk: c as u32,
                row,
            })
        })
        .collect()
}

fn counts(rows: &[RowRef]) -> BTreeMap<RowRef, usize> {
    let mut m = BTreeMap::new();
    for r in rows {
        *m.entry(*r).or_default() += 1;
    }
    m
}

fn uneven_chunks() -> impl Strategy<Value = Vec<u64>> {
    prop::collection::vec(1u64..40, 1..12)
}

/// A labeled set of every `every`-th row, labeled by its position modulo 3.
fn every_nth(chunks: &[u64], every: usize) -> Arc<LabeledSet> {
    let rows = all_rows(chunks)
        .into_iter()
        .enumerate()
        .filter(|(i, _)| i % every == 0)
        .map(|(i, r)| (r, (i % 3) as i64))
        .collect();
    Arc::new(LabeledSet::from_rows(rows))
}

/// The planned batches of every rank of two epochs from the start, as step → rank → batch.
fn two_epochs(plan: &DataPlan, world: u32) -> Vec<Vec<PlannedBatch>> {
    let per_rank: Vec<Vec<PlannedBatch>> = (0..world)
        .map(|rank| {
            (0..2)
                .flat_map(|e| plan.plan(e, world, rank).unwrap())
                .collect()
        })
        .collect();
    (0..per_rank[0].len())
        .map(|s| per_rank.iter().map(|r| r[s].clone()).collect())
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn one_epoch_visits_every_row_exactly_once(
        chunks in uneven_chunks(), world in 1u32..=8, batch in 1u64..24, window in 1u64..64,
        seed in any::<u64>(), epoch in 0u64..4,
    ) {
        let plan = DataPlan::new(chunks.clone(), seed, batch, window, true).unwrap();
        let mut visited = flat(&plan, Cursor::start(epoch), world);
        visited.sort();
        prop_assert_eq!(visited, all_rows(&chunks));
    }

    #[test]
    fn global_batches_do_not_depend_on_world_size(
        chunks in uneven_chunks(), world in 2u32..=8, batch in 1u64..24, window in 1u64..64, seed in any::<u64>(),
    ) {
        let plan = DataPlan::new(chunks, seed, batch, window, true).unwrap();
        let one = run(&plan, Cursor::start(0), 1).remove(0);
        let many = run(&plan, Cursor::start(0), world);
        for (step, single) in one.iter().enumerate() {
            let mut union: Vec<RowRef> = many.iter().flat_map(|r| r[step].clone()).collect();
            union.sort();
            let mut single = single.clone();
            single.sort();
            prop_assert_eq!(&union, &single, "step {}", step);
        }
    }

    #[test]
    fn resume_continues_with_exactly_the_remaining_rows_in_order(
        chunks in uneven_chunks(), world in 1u32..=8, batch in 1u64..24, window in 1u64..64,
        seed in any::<u64>(), at in 0.0f64..=1.0,
    ) {
        let plan = DataPlan::new(chunks, seed, batch, window, true).unwrap();
        let steps = plan.steps_per_epoch();
        let stop = ((steps as f64) * at).floor() as u64;
        let full = run(&plan, Cursor::start(1), world);
        let resumed = run(&plan, Cursor { epoch: 1, step: stop }, world);
        for rank in 0..world as usize {
            prop_assert_eq!(&resumed[rank][..], &full[rank][stop as usize..]);
        }
    }

    #[test]
    fn redealing_the_remainder_to_another_world_visits_each_remaining_row_once(
        chunks in uneven_chunks(), world in 1u32..=8, new_world in 1u32..=8, batch in 1u64..24,
        window in 1u64..64, seed in any::<u64>(), at in 0.0f64..=1.0,
    ) {
        let plan = DataPlan::new(chunks.clone(), seed, batch, window, true).unwrap();
        let stop = ((plan.steps_per_epoch() as f64) * at).floor() as u64;
        let cursor = Cursor { epoch: 0, step: stop };
        let before: Vec<RowRef> = (0..world)
            .flat_map(|rank| plan.rank_plan(Cursor::start(0), world, rank).unwrap().take(stop as usize).flat_map(|b| b.rows))
            .collect();
        let after = flat(&plan, cursor, new_world);
        let mut both = before.clone();
        both.extend(&after);
        prop_assert!(counts(&after).values().all(|n| *n == 1), "no remaining row twice");
        both.sort();
        prop_assert_eq!(both, all_rows(&chunks), "done + remaining = every row once");
    }

    #[test]
    fn composed_batches_cycle_the_labeled_set_the_same_at_any_world_size(
        chunks in uneven_chunks(), world in 1u32..=6, batch in 1u64..24, window in 1u64..64,
        per_batch in 1u64..9, every in 1usize..7, seed in any::<u64>(),
    ) {
        let set = every_nth(&chunks, every);
        let plan = DataPlan::new(chunks.clone(), seed, batch, window, true)
            .unwrap()
            .with_labeled(set.clone(), per_batch)
            .unwrap();
        let one = two_epochs(&plan, 1);
        let many = two_epochs(&plan, world);
        let mut sequence = Vec::new();
        for (step, (single, ranks)) in one.iter().zip(&many).enumerate() {
            let labeled: Vec<(RowRef, u64)> = ranks.iter().flat_map(|b| b.labeled.clone()).collect();
            prop_assert_eq!(&labeled, &single[0].labeled, "step {}: the same labeled rows", step);
            prop_assert_eq!(labeled.len() as u64, per_batch);
            for (i, (_, pass)) in labeled.iter().enumerate() {
                let position = step as u64 * per_batch + i as u64;
                prop_assert_eq!(*pass, position / set.len() as u64, "the pass of each labeled row");
            }
            let unlabeled: u64 = ranks.iter().map(|b| b.rows.len() as u64).sum();
            prop_assert!(ranks.iter().all(|b| b.global_rows == unlabeled + per_batch));
            sequence.extend(labeled.into_iter().map(|(r, _)| r));
        }
        let mut kept: Vec<RowRef> = set.rows().collect();
        kept.sort();
        for pass in sequence.chunks_exact(set.len()) {
            let mut pass = pass.to_vec();
            pass.sort();
            prop_assert_eq!(&pass, &kept, "each pass over the labeled set takes every row once");
        }
        let mut unlabeled: Vec<RowRef> = many.iter().take(plan.steps_per_epoch() as usize).flat_map(|r| r.iter().flat_map(|b| b.rows.clone())).collect();
        unlabeled.sort();
        prop_assert_eq!(unlabeled, all_rows(&chunks), "every row once an epoch, as unlabeled");
    }

    #[test]
    fn composed_plans_resume_with_the_same_labeled_rows(
        chunks in uneven_chunks(), world in 1u32..=6, new_world in 1u32..=6, batch in 1u64..24,
        per_batch in 1u64..9, seed in any::<u64>(), at in 0.0f64..=1.0,
    ) {
        let plan = DataPlan::new(chunks.clone(), seed, batch, 16, true)
            .unwrap()
            .with_labeled(every_nth(&chunks, 2), per_batch)
            .unwrap();
        let steps = plan.steps_per_epoch();
        let stop = ((steps as f64) * at).floor() as u64;
        let labeled_of = |cursor: Cursor, world: u32| -> Vec<Vec<(RowRef, u64)>> {
            let ranks: Vec<Vec<PlannedBatch>> = (0..world)
                .map(|r| plan.rank_plan(cursor, world, r).unwrap().collect())
                .collect();
            (0..ranks[0].len())
                .map(|s| ranks.iter().flat_map(|r| r[s].labeled.clone()).collect())
                .collect()
        };
        let full = labeled_of(Cursor::start(1), world);
        let resumed = labeled_of(Cursor { epoch: 1, step: stop }, new_world);
        prop_assert_eq!(&resumed[..], &full[stop as usize..]);
    }

    #[test]
    fn shares_partition_the_range(n in 0u64..1000, world in 1u32..=16) {
        let mut next = 0;
        for rank in 0..world {
            let (lo, hi) = share(n, world, rank);
            prop_assert_eq!(lo, next);
            prop_assert!(hi - lo <= n / u64::from(world) + 1);
            next = hi;
        }
        prop_assert_eq!(next, n);
    }
}

#[test]
fn epochs_are_shuffled_differently_and_reproducibly() {
    let plan = DataPlan::new(vec![50, 30, 20], 7, 10, 40, true).unwrap();
    let e0 = flat(&plan, Cursor::start(0), 1);
    let e1 = flat(&plan, Cursor::start(1), 1);
    assert_ne!(e0, e1);
    assert_eq!(e0, flat(&plan, Cursor::start(0), 1));
    let other_seed = DataPlan::new(vec![50, 30, 20], 8, 10, 40, true).unwrap();
    assert_ne!(e0, flat(&other_seed, Cursor::start(0), 1));
}

#[test]
fn unshuffled_plan_reads_in_file_order() {
    let plan = DataPlan::new(vec![3, 2], 0, 2, 2, false).unwrap();
    assert_eq!(flat(&plan, Cursor::start(5), 1), all_rows(&[3, 2]));
}

#[test]
fn rank_reads_a_contiguous_slice_of_each_window() {
    // 64 chunks of 100 rows, one window of 6400 rows holding 50 batches of 128 (last short):
    // with the sorted-split dealing, each of 4 ranks touches ~16 chunks + boundaries, not all 64.
    let plan = DataPlan::new(vec![100; 64], 3, 128, 6400, true).unwrap();
    for rank in 0..4 {
        let mut touched: Vec<u32> = plan
            .plan(0, 4, rank)
            .unwrap()
            .flat_map(|b| b.rows)
            .map(|r| r.chunk)
            .collect();
        touched.sort();
        touched.dedup();
        assert!(
            touched.len() <= 32,
            "rank {rank} touched {} of 64 chunks",
            touched.len()
        );
    }
}

#[test]
fn invalid_arguments_are_errors() {
    assert!(DataPlan::new(vec![], 0, 1, 1, true).is_err());
    assert!(DataPlan::new(vec![0, 0], 0, 1, 1, true).is_err());
    assert!(DataPlan::new(vec![5], 0, 0, 1, true).is_err());
    let plan = DataPlan::new(vec![5], 0, 2, 1, true).unwrap();
    assert!(plan.rank_plan(Cursor::start(0), 2, 2).is_err());
    assert!(plan.rank_plan(Cursor::start(0), 0, 0).is_err());
    assert!(plan.rank_plan(Cursor { epoch: 0, step: 4 }, 1, 0).is_err());
    assert_eq!(
        plan.rank_plan(Cursor { epoch: 0, step: 3 }, 1, 0)
            .unwrap()
            .count(),
        0
    );
}
