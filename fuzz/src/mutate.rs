//! A small, seeded, reproducible mutation engine: a splitmix64 generator and the usual
//! mutations (bit flips, byte and word sets to interesting values, inserts, deletes,
//! duplications, splices with another corpus entry, truncation).

/// splitmix64: tiny, fast, and the same sequence on every machine for a given seed.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed`.
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// A number in `0..n` (0 when n is 0).
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next_u64() % n as u64) as usize
        }
    }
}

/// The largest input the mutator makes.
pub const MAX_LEN: usize = 8192;

const INTERESTING: [u64; 12] = [
    0,
    1,
    0x7f,
    0x80,
    0xff,
    0x100,
    0x7fff,
    0xffff,
    0x1_0000,
    0x7fff_ffff,
    0xffff_ffff,
    u64::MAX,
];

/// FNV-1a, to seed each target differently from its name.
pub fn hash(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

/// Input number `n` of a run over `corpus` for `target`: a corpus entry with 1 to 8
/// mutations, the same for the same (target, n, corpus) everywhere.
pub fn mutant(target: &str, n: u64, corpus: &[Vec<u8>]) -> Vec<u8> {
    let mut rng = Rng::new(hash(target) ^ n.wrapping_mul(0x2545_f491_4f6c_dd1d));
    let mut data = if corpus.is_empty() {
        Vec::new()
    } else {
        corpus[rng.below(corpus.len())].clone()
    };
    let rounds = 1 + rng.below(8);
    for _ in 0..rounds {
        mutate(&mut rng, &mut data, corpus);
    }
    data.truncate(MAX_LEN);
    data
}

fn mutate(rng: &mut Rng, data: &mut Vec<u8>, corpus: &[Vec<u8>]) {
    if data.is_empty() {
        data.extend((0..1 + rng.below(64)).map(|_| rng.next_u64() as u8));
        return;
    }
    let len = data.len();
    let at = rng.below(len);
    match rng.below(10) {
        0 | 1 => data[at] ^= 1 << rng.below(8),
        2 => data[at] = rng.next_u64() as u8,
        3 => {
            // An interesting value of 1, 2, 4 or 8 bytes.
            let v = INTERESTING[rng.below(INTERESTING.len())].to_le_bytes();
            let width = [1usize, 2, 4, 8][rng.below(4)];
            let end = (at + width).min(len);
            data[at..end].copy_from_slice(&v[..end - at]);
        }
        4 => {
            // Add or subtract a little from a byte (lengths, indexes).
            let d = 1 + rng.below(16) as u8;
            data[at] = if rng.below(2) == 0 {
                data[at].wrapping_add(d)
            } else {
                data[at].wrapping_sub(d)
            };
        }
        5 => {
            let n = 1 + rng.below(16);
            let bytes: Vec<u8> = (0..n).map(|_| rng.next_u64() as u8).collect();
            data.splice(at..at, bytes);
        }
        6 => {
            let end = (at + 1 + rng.below(32)).min(len);
            data.drain(at..end);
        }
        7 => {
            // Duplicate a block (repeats an op).
            let end = (at + 1 + rng.below(64)).min(len);
            let block = data[at..end].to_vec();
            let to = rng.below(data.len() + 1);
            data.splice(to..to, block);
        }
        8 => {
            // Splice in a piece of another entry.
            if let Some(other) = corpus
                .get(rng.below(corpus.len()))
                .filter(|o| !o.is_empty())
            {
                let from = rng.below(other.len());
                let end = (from + 1 + rng.below(128)).min(other.len());
                data.splice(at..at, other[from..end].iter().copied());
            }
        }
        _ => data.truncate(at.max(1)),
    }
}
