//! The smoke run of every fuzz target: its corpus, then seeded mutations of it (bit flips,
//! cuts, splices, inserted bytes), a few thousand inputs per target, so a decoder change
//! that breaks an invariant fails `cargo test` without a fuzzer.

#![allow(clippy::unwrap_used, reason = "tests fail loudly on any error")]

use std::path::{Path, PathBuf};

const MUTATIONS_PER_TARGET: usize = 3_000;

fn corpus(target: &str) -> Vec<Vec<u8>> {
    let directory: PathBuf = [env!("CARGO_MANIFEST_DIR"), "corpus", target]
        .iter()
        .collect();
    let mut inputs: Vec<Vec<u8>> = std::fs::read_dir(&directory)
        .unwrap_or_else(|error| panic!("corpus {}: {error}", directory.display()))
        .map(|entry| std::fs::read(entry.unwrap().path()).unwrap())
        .collect();
    inputs.sort();
    inputs
}

fn mutate(rng: &mut fastrand::Rng, seed: &[u8], other: &[u8]) -> Vec<u8> {
    let mut input = seed.to_vec();
    for _ in 0..rng.usize(1..=4) {
        match rng.u8(0..5) {
            0 if !input.is_empty() => {
                let at = rng.usize(..input.len());
                input[at] ^= 1 << rng.u8(0..8);
            }
            1 if !input.is_empty() => input.truncate(rng.usize(..input.len())),
            2 => {
                let at = rng.usize(..=input.len());
                let byte = *rng.choice(b"\0\n\r:,{}\"\\%\x80\xff\x7f ").unwrap();
                input.insert(at, byte);
            }
            3 if !other.is_empty() => {
                let at = rng.usize(..=input.len());
                let from = rng.usize(..other.len());
                input.splice(at..at, other[from..].iter().copied());
            }
            _ => {
                let at = rng.usize(..=input.len());
                input.insert(at, rng.u8(..));
            }
        }
    }
    input
}

#[test]
fn every_target_keeps_its_invariants_on_its_corpus_and_mutations_of_it() {
    for (name, target) in resync_fuzz::TARGETS {
        let seeds = corpus(name);
        assert!(!seeds.is_empty(), "{name} has no corpus");
        for seed in &seeds {
            target(seed);
        }
        let mut rng = fastrand::Rng::with_seed(0x7e57);
        for _ in 0..MUTATIONS_PER_TARGET {
            let seed = rng.choice(&seeds).unwrap();
            let other = rng.choice(&seeds).unwrap();
            let input = mutate(&mut rng, seed, other);
            let outcome = std::panic::catch_unwind(|| target(&input));
            if outcome.is_err() {
                let saved = save_crash(name, &input);
                panic!(
                    "{name} broke an invariant on {input:?} (saved to {})",
                    saved.display()
                );
            }
        }
    }
}

#[test]
fn every_target_has_a_binary_and_a_corpus() {
    let manifest =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml")).unwrap();
    for (name, _) in resync_fuzz::TARGETS {
        assert!(
            manifest.contains(&format!("path = \"fuzz_targets/{name}.rs\"")),
            "{name} has no [[bin]] in fuzz/Cargo.toml"
        );
        assert!(!corpus(name).is_empty());
    }
}

/// Writes a failing input where `cargo xtask fuzz` can replay it.
fn save_crash(target: &str, input: &[u8]) -> PathBuf {
    let directory = std::env::temp_dir()
        .join("resync-fuzz-crashes")
        .join(target);
    let _ = std::fs::create_dir_all(&directory);
    let path = directory.join(format!("crash-{:016x}", fastrand::u64(..)));
    let _ = std::fs::write(&path, input);
    path
}
