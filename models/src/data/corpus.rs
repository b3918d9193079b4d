//! The embedded English-like text corpus: a small probabilistic grammar, expanded from a seed.
//!
//! Why a grammar instead of a bundled book: it costs no download and no licence question, it is
//! deterministic per seed, and its structure is graded so a tiny byte-level GPT shows visible
//! progress: spelling of a ~150-word vocabulary is learned first (loss drops from ~5.5 nats
//! fast), then agreement and fixed associations (the cow says moo, the sky is blue), and the
//! arithmetic facts ("seven plus two is nine.") reward longer-range attention.
//!
//! The opening of the seed-0 corpus (one paragraph per line; long lines wrapped here), then
//! lines of the other paragraph kinds found further on:
//!
//! ```text
//! A bird has two legs. A cat has four legs. Hens lay eggs. The sky is blue. Fish swim in the
//! water.
//! The sky is blue. Rain falls from the clouds. The sun is hot and bright. The grass is green.
//! Leo has a mouse. Leo has one bell. Then he finds three more. Now he has four bells. The
//! mouse says squeak, squeak. Leo and the mouse dance in the garden. He takes the shiny apple.
//! "What does the mouse say?" asked Sam. "The mouse says squeak," said Leo. The mouse says
//! squeak, squeak. At night Leo and the mice sleep. The end.
//! ...
//! Four plus six is ten. What is three plus three? It is six. What is ten plus ten? It is
//! twenty. Eleven minus nine is two. What is eight plus one? It is nine.
//! Old MacDonald had a farm, ee i ee i o. And on that farm he had a horse, ee i ee i o. With a
//! neigh neigh here and a neigh neigh there.
//! Count with me: eleven, twelve, thirteen, fourteen, fifteen, sixteen, seventeen. After
//! fourteen comes fifteen. Before five comes four.
//! ```
//!
//! The test `embedded_text_sample_is_english_like` prints the real opening; a 4-gram count
//! model fit on the training split already scores about 0.75 nats/byte on validation.

use super::rng::DetRng;

const BOYS: &[&str] = &["Tom", "Sam", "Ben", "Max", "Leo"];
const GIRLS: &[&str] = &["Anna", "Lily", "Mia", "Zoe", "Eva"];

/// (singular, plural, sound)
const ANIMALS: &[(&str, &str, &str)] = &[
    ("cat", "cats", "meow"),
    ("dog", "dogs", "woof"),
    ("cow", "cows", "moo"),
    ("duck", "ducks", "quack"),
    ("hen", "hens", "cluck"),
    ("sheep", "sheep", "baa"),
    ("frog", "frogs", "ribbit"),
    ("bird", "birds", "tweet"),
    ("mouse", "mice", "squeak"),
    ("horse", "horses", "neigh"),
    ("owl", "owls", "hoot"),
    ("bee", "bees", "buzz"),
];

/// (singular, plural)
const THINGS: &[(&str, &str)] = &[
    ("ball", "balls"),
    ("box", "boxes"),
    ("cup", "cups"),
    ("hat", "hats"),
    ("book", "books"),
    ("apple", "apples"),
    ("kite", "kites"),
    ("cake", "cakes"),
    ("bell", "bells"),
    ("boat", "boats"),
    ("shoe", "shoes"),
    ("key", "keys"),
    ("drum", "drums"),
    ("star", "stars"),
];

const ADJECTIVES: &[&str] = &[
    "big", "small", "red", "blue", "green", "old", "new", "little", "happy", "yellow", "soft", "funny", "brown",
    "shiny",
];
const VERBS_TRANSITIVE: &[&str] =
    &["sees", "likes", "finds", "wants", "has", "takes", "holds", "drops", "loves", "hides", "paints", "throws"];
/// Third person singular; the plural form is the same word without its final "s".
const VERBS_INTRANSITIVE: &[&str] =
    &["runs", "jumps", "sleeps", "sings", "swims", "sits", "plays", "walks", "hops", "dances"];
const ADVERBS: &[&str] = &["quickly", "slowly", "happily", "quietly", "again", "all day", "every morning", "at night"];
const PLACES: &[&str] = &[
    "in the garden",
    "on the hill",
    "by the river",
    "under the tree",
    "in the house",
    "near the pond",
    "at school",
    "in the park",
    "on the farm",
    "by the sea",
];
const FEELINGS: &[&str] = &["happy", "sad", "tired", "glad", "sleepy", "proud"];

pub(crate) const NUMBERS: [&str; 21] = [
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
    "nineteen",
    "twenty",
];

const FACTS: &[&str] = &[
    "the sky is blue.",
    "the grass is green.",
    "snow is white and cold.",
    "the sun is hot and bright.",
    "ice is cold.",
    "fish swim in the water.",
    "birds fly in the sky.",
    "the moon comes out at night.",
    "a week has seven days.",
    "a cat has four legs.",
    "a bird has two legs.",
    "a spider has eight legs.",
    "bees make honey.",
    "cows give milk.",
    "hens lay eggs.",
    "rain falls from the clouds.",
    "apples grow on trees.",
    "a year has twelve months.",
];

const RHYMES: &[&str] = &[
    "one, two, buckle my shoe. three, four, knock at the door. five, six, pick up sticks. \
     seven, eight, lay them straight. nine, ten, a big fat hen.",
    "twinkle, twinkle, little star, how I wonder what you are. up above the world so high, \
     like a diamond in the sky.",
    "rain, rain, go away, come again another day.",
    "humpty dumpty sat on a wall. humpty dumpty had a great fall.",
    "row, row, row your boat, gently down the stream. merrily, merrily, merrily, merrily, \
     life is but a dream.",
];

/// Appends sentences, capitalising each one's first letter (and a quoted sentence's first
/// letter) so the text looks like English rather than a word salad.
struct Writer {
    out: Vec<u8>,
    line_start: bool,
}

impl Writer {
    fn sentence(&mut self, s: &str) {
        if !self.line_start {
            self.out.push(b' ');
        }
        self.line_start = false;
        let mut capitalise_next = true;
        let mut prev = b' ';
        for &b in s.as_bytes() {
            // Sentence starts inside the string: after ". ", "? " or an opening quote.
            if b.is_ascii_alphabetic() && capitalise_next {
                self.out.push(b.to_ascii_uppercase());
                capitalise_next = false;
            } else {
                self.out.push(b);
                if b.is_ascii_alphabetic() {
                    capitalise_next = false;
                }
            }
            if (b == b' ' && matches!(prev, b'.' | b'?' | b'!')) || (b == b'"' && prev == b' ') {
                capitalise_next = true;
            }
            prev = b;
        }
    }

    fn end_paragraph(&mut self) {
        self.out.push(b'\n');
        self.line_start = true;
    }
}

/// Generates about `target_bytes` bytes (stops at the first paragraph end at or past it) of
/// pure-ASCII text, deterministic in `seed`.
pub(crate) fn generate(seed: u64, target_bytes: usize) -> Vec<u8> {
    let mut rng = DetRng::for_stream(seed, 0x7E57, 0);
    let mut w = Writer { out: Vec::with_capacity(target_bytes + 1024), line_start: true };
    while w.out.len() < target_bytes {
        match rng.below(10) {
            0..=4 => story(&mut rng, &mut w),
            5 | 6 => arithmetic(&mut rng, &mut w),
            7 => counting(&mut rng, &mut w),
            8 => rhyme(&mut rng, &mut w),
            _ => facts(&mut rng, &mut w),
        }
        w.end_paragraph();
    }
    w.out
}

fn opt_adj(rng: &mut DetRng) -> String {
    if rng.chance(0.6) {
        format!("{} ", rng.pick(ADJECTIVES))
    } else {
        String::new()
    }
}

/// "a cat", "an owl", "an old dog".
fn with_article(phrase: &str) -> String {
    let vowel = phrase.starts_with(['a', 'e', 'i', 'o', 'u']);
    format!("{} {phrase}", if vowel { "an" } else { "a" })
}

fn plural_verb(v: &str) -> &str {
    v.strip_suffix('s').unwrap_or(v)
}

/// A little story with a hero, a pet and consistent pronouns across its sentences.
fn story(rng: &mut DetRng, w: &mut Writer) {
    let girl = rng.chance(0.5);
    let hero = *rng.pick(if girl { GIRLS } else { BOYS });
    let (pron, poss) = if girl { ("she", "her") } else { ("he", "his") };
    let other_names = if rng.chance(0.5) { GIRLS } else { BOYS };
    let other = *rng.pick(other_names);
    let other = if other == hero { "Mum" } else { other };
    let &(animal, animals, sound) = rng.pick(ANIMALS);
    let pet = format!("{}{animal}", opt_adj(rng));
    w.sentence(&format!("{hero} has {}.", with_article(&pet)));
    for _ in 0..3 + rng.below(5) {
        let &(thing, things) = rng.pick(THINGS);
        let s = match rng.below(10) {
            0 => format!("the {animal} {} {}.", rng.pick(VERBS_INTRANSITIVE), rng.pick(PLACES)),
            1 => format!("the {animal} {} {}.", rng.pick(VERBS_INTRANSITIVE), rng.pick(ADVERBS)),
            2 => format!("{pron} {} the {}{thing}.", rng.pick(VERBS_TRANSITIVE), opt_adj(rng)),
            3 => format!(
                "{hero} and the {animal} {} {}.",
                plural_verb(rng.pick::<&str>(VERBS_INTRANSITIVE)),
                rng.pick(PLACES)
            ),
            4 => format!(
                "\"where is the {thing}?\" asked {hero}. \"the {thing} is {},\" said {other}.",
                rng.pick(PLACES)
            ),
            5 => format!(
                "\"what does the {animal} say?\" asked {other}. \"the {animal} says {sound},\" \
                 said {hero}."
            ),
            6 => {
                let n = 1 + rng.below(9) as usize;
                let m = 1 + rng.below(9) as usize;
                let name = |k: usize| if k == 1 { thing } else { things };
                format!(
                    "{hero} has {} {}. then {pron} finds {} more. now {pron} has {} {}.",
                    NUMBERS[n],
                    name(n),
                    NUMBERS[m],
                    NUMBERS[n + m],
                    name(n + m)
                )
            }
            7 => format!(
                "{pron} is {} because the {animal} {} {}.",
                rng.pick(FEELINGS),
                rng.pick(VERBS_INTRANSITIVE),
                rng.pick(ADVERBS)
            ),
            8 => format!("{pron} gives {poss} {thing} to {other}."),
            _ => format!("the {animal} says {sound}, {sound}."),
        };
        w.sentence(&s);
    }
    if rng.chance(0.3) {
        w.sentence(&format!("at night {hero} and the {animals} sleep. the end."));
    }
}

/// Correct arithmetic facts with small numbers (every result is 0..=20, named in words).
fn arithmetic(rng: &mut DetRng, w: &mut Writer) {
    for _ in 0..3 + rng.below(4) {
        let s = match rng.below(5) {
            0 | 1 => {
                let a = rng.below_usize(11);
                let b = rng.below_usize(11);
                let (x, y) = (NUMBERS[a], NUMBERS[b]);
                let z = NUMBERS[a + b];
                if rng.chance(0.5) {
                    format!("{x} plus {y} is {z}.")
                } else {
                    format!("what is {x} plus {y}? it is {z}.")
                }
            }
            2 => {
                let a = rng.below_usize(21);
                let b = rng.below_usize(a + 1);
                format!("{} minus {} is {}.", NUMBERS[a], NUMBERS[b], NUMBERS[a - b])
            }
            3 => {
                let a = 1 + rng.below_usize(5);
                let b = rng.below_usize(20 / a + 1);
                if rng.chance(0.5) {
                    format!("{} times {} is {}.", NUMBERS[a], NUMBERS[b], NUMBERS[a * b])
                } else {
                    format!("what is {} times {}? it is {}.", NUMBERS[a], NUMBERS[b], NUMBERS[a * b])
                }
            }
            _ => {
                let a = rng.below_usize(21);
                let mut b = rng.below_usize(21);
                if b == a {
                    b = (a + 1) % 21;
                }
                let (hi, lo) = if a > b { (a, b) } else { (b, a) };
                if rng.chance(0.5) {
                    format!("{} is bigger than {}.", NUMBERS[hi], NUMBERS[lo])
                } else {
                    format!("{} is smaller than {}.", NUMBERS[lo], NUMBERS[hi])
                }
            }
        };
        w.sentence(&s);
    }
}

fn counting(rng: &mut DetRng, w: &mut Writer) {
    let start = rng.below_usize(12);
    let len = 4 + rng.below_usize(6);
    let end = (start + len).min(20);
    let list: Vec<&str> = NUMBERS[start..=end].to_vec();
    w.sentence(&format!("count with me: {}.", list.join(", ")));
    let a = rng.below_usize(20);
    w.sentence(&format!("after {} comes {}.", NUMBERS[a], NUMBERS[a + 1]));
    let b = 1 + rng.below_usize(20);
    w.sentence(&format!("before {} comes {}.", NUMBERS[b], NUMBERS[b - 1]));
}

fn rhyme(rng: &mut DetRng, w: &mut Writer) {
    if rng.chance(0.5) {
        w.sentence(rng.pick::<&str>(RHYMES));
        return;
    }
    let &(animal, _, sound) = rng.pick(ANIMALS);
    w.sentence(&format!(
        "old MacDonald had a farm, ee i ee i o. and on that farm he had {}, ee i ee i o. \
         with a {sound} {sound} here and a {sound} {sound} there.",
        with_article(animal)
    ));
}

fn facts(rng: &mut DetRng, w: &mut Writer) {
    for _ in 0..2 + rng.below(4) {
        w.sentence(rng.pick::<&str>(FACTS));
    }
}
