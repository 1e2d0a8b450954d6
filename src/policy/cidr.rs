//! An immutable longest-prefix-match table over IP prefixes.
//!
//! The prefixes are flattened at build time into sorted, disjoint address
//! intervals, each carrying the value of the most specific prefix covering it.
//! A direct-indexed table on the top bits of the address narrows a lookup to
//! the few intervals of one bucket, then a binary search finishes it:
//! O(log n) worst case, a couple of memory accesses typically, no
//! allocation, no lock, and the memory is two flat arrays. An interval's
//! start, end and value sit side by side, so the bucket search and the
//! answer usually come from one cache line (at 10^6 prefixes the table is far
//! larger than the cache, and each separate array cost a miss of its own).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;

/// An address width the table can index (`u32` for IPv4, `u128` for IPv6).
pub trait AddrKey: Copy + Ord {
    /// The successor of `self`, or `None` at the top of the address space.
    fn next(self) -> Option<Self>;
    /// The predecessor of `self`, or `None` at zero.
    fn prev(self) -> Option<Self>;
    /// The top `bits` bits of `self` (1 ≤ bits ≤ 24).
    fn bucket(self, bits: u32) -> usize;
    /// The first address of bucket `b` for `bits`-bit buckets.
    fn bucket_start(b: usize, bits: u32) -> Self;
}

impl AddrKey for u32 {
    fn bucket(self, bits: u32) -> usize {
        (self >> (32 - bits)) as usize
    }
    fn bucket_start(b: usize, bits: u32) -> Self {
        (b as u32) << (32 - bits)
    }
    fn next(self) -> Option<Self> {
        self.checked_add(1)
    }
    fn prev(self) -> Option<Self> {
        self.checked_sub(1)
    }
}

impl AddrKey for u128 {
    fn bucket(self, bits: u32) -> usize {
        (self >> (128 - bits)) as usize
    }
    fn bucket_start(b: usize, bits: u32) -> Self {
        (b as u128) << (128 - bits)
    }
    fn next(self) -> Option<Self> {
        self.checked_add(1)
    }
    fn prev(self) -> Option<Self> {
        self.checked_sub(1)
    }
}

/// One flattened interval `[start, end]` and its value.
#[derive(Debug, Clone)]
struct Interval<K, V> {
    start: K,
    end: K,
    value: V,
}

/// Sorted disjoint intervals, each carrying a value.
#[derive(Debug, Clone)]
pub struct IntervalTable<K, V> {
    entries: Vec<Interval<K, V>>,
    /// `index[b]` is the number of intervals starting before bucket `b`;
    /// empty when the table is empty.
    index: Vec<u32>,
    /// Bucket width in address bits.
    bits: u32,
}

/// Bucket bits for `n` intervals: about one interval per bucket, between
/// 2^8 and 2^20 buckets (4 MiB of index at most).
fn bucket_bits(n: usize) -> u32 {
    (usize::BITS - n.leading_zeros()).clamp(8, 20)
}

impl<K: AddrKey, V: Clone + PartialEq> IntervalTable<K, V> {
    /// Builds the table from inclusive `(first, last, value)` prefix ranges.
    /// Ranges must nest or be disjoint (true of CIDR prefixes). Where two
    /// ranges are identical, the later one in `ranges` wins.
    pub fn from_prefix_ranges(mut ranges: Vec<(K, K, V)>) -> Self {
        // Containing prefixes sort before the prefixes they contain, so the
        // sequence is a pre-order walk of the nesting tree. A stable sort keeps
        // identical ranges in input order; the later one is kept below.
        ranges.sort_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
        let mut deduped: Vec<(K, K, V)> = Vec::with_capacity(ranges.len());
        for range in ranges {
            match deduped.last_mut() {
                Some(last) if last.0 == range.0 && last.1 == range.1 => *last = range,
                _ => deduped.push(range),
            }
        }
        let mut builder = Builder::default();
        for (first, last, value) in deduped {
            builder.enter(first, last, value);
        }
        builder.finish()
    }

    /// The value of the most specific range covering `key`.
    #[inline]
    pub fn lookup(&self, key: K) -> Option<&V> {
        let b = key.bucket(self.bits);
        let (lo, hi) = (*self.index.get(b)? as usize, self.index[b + 1] as usize);
        // The answer is the last interval starting at or before `key`: inside
        // this bucket, or the one before it reaching in from an earlier bucket.
        let idx = lo + self.entries[lo..hi].partition_point(|e| e.start <= key);
        let entry = &self.entries[idx.checked_sub(1)?];
        (key <= entry.end).then_some(&entry.value)
    }

    fn build_index(&mut self) {
        let n = self.entries.len();
        if n == 0 {
            return;
        }
        self.bits = bucket_bits(n);
        let buckets = 1usize << self.bits;
        let mut index = Vec::with_capacity(buckets + 1);
        let mut i = 0;
        for b in 0..buckets {
            let first = K::bucket_start(b, self.bits);
            while i < n && self.entries[i].start < first {
                i += 1;
            }
            index.push(i as u32);
        }
        index.push(n as u32);
        self.index = index;
    }

    /// The number of disjoint intervals (at most twice the prefix count).
    pub fn interval_count(&self) -> usize {
        self.entries.len()
    }

    /// Approximate heap bytes held by the table.
    pub fn heap_bytes(&self) -> usize {
        self.entries.capacity() * std::mem::size_of::<Interval<K, V>>()
            + self.index.capacity() * std::mem::size_of::<u32>()
    }
}

/// Emits the flattened intervals while walking nested ranges in pre-order.
struct Builder<K, V> {
    table: IntervalTable<K, V>,
    /// Enclosing ranges, innermost last: (last address, value).
    stack: Vec<(K, V)>,
    /// The first address not yet emitted; `None` once the top of the address
    /// space has been emitted.
    cursor: Option<K>,
}

impl<K, V> Default for Builder<K, V> {
    fn default() -> Self {
        Builder {
            table: IntervalTable { entries: Vec::new(), index: Vec::new(), bits: 8 },
            stack: Vec::new(),
            cursor: None,
        }
    }
}

impl<K: AddrKey, V: Clone + PartialEq> Builder<K, V> {
    fn enter(&mut self, first: K, last: K, value: V) {
        while let Some((end, _)) = self.stack.last() {
            if *end >= first {
                break;
            }
            self.close_top();
        }
        if let (Some((_, outer)), Some(cursor)) = (self.stack.last(), self.cursor) {
            if cursor < first {
                let outer = outer.clone();
                // `first > cursor >= 0`, so it has a predecessor.
                let before = first.prev().expect("first > cursor implies first > 0");
                self.emit(cursor, before, outer);
            }
        }
        self.stack.push((last, value));
        self.cursor = Some(first);
    }

    fn close_top(&mut self) {
        let Some((end, value)) = self.stack.pop() else { return };
        if let Some(cursor) = self.cursor {
            if cursor <= end {
                self.emit(cursor, end, value);
                self.cursor = end.next();
            }
        }
    }

    fn emit(&mut self, first: K, last: K, value: V) {
        let t = &mut self.table;
        if let Some(prev) = t.entries.last_mut() {
            if prev.end.next() == Some(first) && prev.value == value {
                prev.end = last;
                return;
            }
        }
        t.entries.push(Interval { start: first, end: last, value });
    }

    fn finish(mut self) -> IntervalTable<K, V> {
        while !self.stack.is_empty() {
            self.close_top();
        }
        let mut table = self.table;
        table.entries.shrink_to_fit();
        table.build_index();
        table
    }
}

/// A longest-prefix-match table for both address families.
#[derive(Debug, Clone)]
pub struct CidrTable<V> {
    v4: IntervalTable<u32, V>,
    v6: IntervalTable<u128, V>,
}

impl<V: Clone + PartialEq> CidrTable<V> {
    /// Builds a table; for identical prefixes the later entry wins.
    pub fn new(entries: impl IntoIterator<Item = (IpNet, V)>) -> Self {
        let mut v4 = Vec::new();
        let mut v6 = Vec::new();
        for (net, value) in entries {
            match net.trunc() {
                IpNet::V4(n) => v4.push((u32::from(n.network()), u32::from(n.broadcast()), value)),
                IpNet::V6(n) => v6.push((u128::from(n.network()), u128::from(n.broadcast()), value)),
            }
        }
        CidrTable {
            v4: IntervalTable::from_prefix_ranges(v4),
            v6: IntervalTable::from_prefix_ranges(v6),
        }
    }

    /// The value of the longest prefix covering `addr`.
    #[inline]
    pub fn lookup(&self, addr: IpAddr) -> Option<&V> {
        match addr {
            IpAddr::V4(a) => self.lookup_v4(a),
            IpAddr::V6(a) => self.lookup_v6(a),
        }
    }

    /// The value of the longest IPv4 prefix covering `addr`.
    #[inline]
    pub fn lookup_v4(&self, addr: Ipv4Addr) -> Option<&V> {
        self.v4.lookup(u32::from(addr))
    }

    /// The value of the longest IPv6 prefix covering `addr`.
    #[inline]
    pub fn lookup_v6(&self, addr: Ipv6Addr) -> Option<&V> {
        self.v6.lookup(u128::from(addr))
    }

    /// True when the table holds no prefix.
    pub fn is_empty(&self) -> bool {
        self.v4.interval_count() == 0 && self.v6.interval_count() == 0
    }

    /// Approximate heap bytes held by the table.
    pub fn heap_bytes(&self) -> usize {
        self.v4.heap_bytes() + self.v6.heap_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(entries: &[(&str, u32)]) -> CidrTable<u32> {
        CidrTable::new(entries.iter().map(|(n, v)| (n.parse().unwrap(), *v)))
    }

    #[test]
    fn longest_prefix_wins() {
        let t = table(&[
            ("10.0.0.0/8", 1),
            ("10.1.0.0/16", 2),
            ("10.1.2.0/24", 3),
            ("10.1.2.3/32", 4),
            ("0.0.0.0/0", 0),
            ("::/0", 10),
            ("fd00::/8", 11),
            ("fd00:ec2::254/128", 12),
        ]);
        let cases: &[(&str, Option<u32>)] = &[
            ("10.0.0.1", Some(1)),
            ("10.1.0.1", Some(2)),
            ("10.1.2.2", Some(3)),
            ("10.1.2.3", Some(4)),
            ("10.1.2.4", Some(3)),
            ("10.1.3.0", Some(2)),
            ("10.2.0.0", Some(1)),
            ("11.0.0.0", Some(0)),
            ("255.255.255.255", Some(0)),
            ("0.0.0.0", Some(0)),
            ("fd00:ec2::254", Some(12)),
            ("fd00:ec2::253", Some(11)),
            ("fe00::", Some(10)),
            ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", Some(10)),
        ];
        for (addr, want) in cases {
            assert_eq!(t.lookup(addr.parse().unwrap()).copied(), *want, "{addr}");
        }
    }

    #[test]
    fn misses_and_edges() {
        let t = table(&[("255.255.255.255/32", 1), ("0.0.0.0/32", 2), ("128.0.0.0/1", 3)]);
        assert_eq!(t.lookup("255.255.255.255".parse().unwrap()), Some(&1));
        assert_eq!(t.lookup("255.255.255.254".parse().unwrap()), Some(&3));
        assert_eq!(t.lookup("0.0.0.0".parse().unwrap()), Some(&2));
        assert_eq!(t.lookup("0.0.0.1".parse().unwrap()), None);
        assert_eq!(t.lookup("127.255.255.255".parse().unwrap()), None);
        assert_eq!(t.lookup("::1".parse().unwrap()), None);
    }

    #[test]
    fn identical_prefix_later_wins() {
        let t = table(&[("10.0.0.0/8", 1), ("10.0.0.0/8", 2)]);
        assert_eq!(t.lookup("10.9.9.9".parse().unwrap()), Some(&2));
    }

    /// A small deterministic generator so the property test needs no crate.
    struct XorShift(u64);
    impl XorShift {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
    }

    fn linear_lookup(entries: &[(IpNet, u32)], addr: IpAddr) -> Option<u32> {
        // Later identical prefixes win, as in the table.
        entries
            .iter()
            .enumerate()
            .filter(|(_, (net, _))| net.contains(&addr))
            .max_by_key(|(i, (net, _))| (net.prefix_len(), *i))
            .map(|(_, (_, v))| *v)
    }

    #[test]
    fn matches_linear_scan_on_random_prefixes() {
        let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
        for round in 0..20 {
            let mut entries = Vec::new();
            for i in 0..(50 + round * 20) {
                // Few high bits so that prefixes nest often.
                let bits = (rng.next() as u32) & 0xff0f_00ff;
                let len = (rng.next() % 33) as u8;
                let net = ipnet::Ipv4Net::new(Ipv4Addr::from(bits), len).unwrap().trunc();
                entries.push((IpNet::V4(net), i as u32));
                let bits6 = ((rng.next() as u128) << 64) & (0xff0f_u128 << 112);
                let len6 = (rng.next() % 129) as u8;
                let net6 = ipnet::Ipv6Net::new(Ipv6Addr::from(bits6), len6).unwrap().trunc();
                entries.push((IpNet::V6(net6), 10_000 + i as u32));
            }
            let t = CidrTable::new(entries.iter().cloned());
            for _ in 0..2000 {
                let a4 = IpAddr::V4(Ipv4Addr::from((rng.next() as u32) & 0xff0f_ffff));
                assert_eq!(t.lookup(a4).copied(), linear_lookup(&entries, a4), "{a4}");
                let a6 = IpAddr::V6(Ipv6Addr::from(((rng.next() as u128) << 64 | rng.next() as u128) & !(0x00f0_u128 << 112)));
                assert_eq!(t.lookup(a6).copied(), linear_lookup(&entries, a6), "{a6}");
            }
        }
    }
}
