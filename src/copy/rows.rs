//! Counting the rows of a COPY stream as it passes, without holding it: the text format ends
//! every row with a newline (newlines inside values are escaped as `\n`); the binary format
//! (PostgreSQL docs, "COPY", "Binary Format") is a header, then per tuple a 16-bit field count
//! and per field a 32-bit length (-1: NULL) and that many bytes, then a trailer of -1.
//!
//! The counter only feeds progress displays: it never fails, and on bytes that break the
//! binary format it stops counting (the row count `COPY FROM` reports is the one recorded).

/// The binary header: signature, flags, header-extension length.
const HEADER_LEN: usize = 11 + 4 + 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum St {
    /// Collecting the fixed header.
    Header,
    /// Skipping the header extension.
    Ext(u32),
    /// Expecting a tuple's field count.
    Count,
    /// Expecting a field's length; fields left in the tuple (this one included).
    Len(u16),
    /// Skipping a field's bytes.
    Data(u32, u16),
    /// Trailer seen, or the stream broke the format: count nothing more.
    Done,
}

/// Counts rows of one COPY stream.
#[derive(Debug, Clone)]
pub struct RowCounter {
    binary: bool,
    rows: u64,
    st: St,
    small: [u8; HEADER_LEN],
    have: usize,
}

impl RowCounter {
    /// A counter for a binary (`true`) or text stream.
    pub fn new(binary: bool) -> RowCounter {
        RowCounter {
            binary,
            rows: 0,
            st: St::Header,
            small: [0; HEADER_LEN],
            have: 0,
        }
    }

    /// Rows begun so far.
    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// Collects `n` bytes into `small`; true once they are all there.
    fn gather(&mut self, b: &mut &[u8], n: usize) -> bool {
        let take = (n - self.have).min(b.len());
        self.small[self.have..self.have + take].copy_from_slice(&b[..take]);
        self.have += take;
        *b = &b[take..];
        if self.have == n {
            self.have = 0;
            true
        } else {
            false
        }
    }

    /// After a field: the next field, or the next tuple.
    fn next_field(left: u16) -> St {
        if left <= 1 {
            St::Count
        } else {
            St::Len(left - 1)
        }
    }

    /// Counts the rows that begin in `bytes`, the next piece of the stream.
    pub fn feed(&mut self, bytes: &[u8]) {
        if !self.binary {
            self.rows += bytes.iter().filter(|&&c| c == b'\n').count() as u64;
            return;
        }
        let mut b = bytes;
        while !b.is_empty() {
            self.st = match self.st {
                St::Done => return,
                St::Header => {
                    if !self.gather(&mut b, HEADER_LEN) {
                        return;
                    }
                    if &self.small[..11] != b"PGCOPY\n\xff\r\n\0" {
                        St::Done
                    } else {
                        let ext = u32::from_be_bytes(self.small[15..19].try_into().unwrap());
                        St::Ext(ext)
                    }
                }
                St::Ext(left) => {
                    let skip = (left as usize).min(b.len());
                    b = &b[skip..];
                    match left - skip as u32 {
                        0 => St::Count,
                        rest => St::Ext(rest),
                    }
                }
                St::Count => {
                    if !self.gather(&mut b, 2) {
                        return;
                    }
                    match i16::from_be_bytes([self.small[0], self.small[1]]) {
                        -1 => St::Done,
                        n if n < 0 => St::Done,
                        0 => {
                            self.rows += 1;
                            St::Count
                        }
                        n => {
                            self.rows += 1;
                            St::Len(n as u16)
                        }
                    }
                }
                St::Len(left) => {
                    if !self.gather(&mut b, 4) {
                        return;
                    }
                    match i32::from_be_bytes(self.small[..4].try_into().unwrap()) {
                        -1 | 0 => Self::next_field(left),
                        n if n < 0 => St::Done,
                        n => St::Data(n as u32, left),
                    }
                }
                St::Data(len, left) => {
                    let skip = (len as usize).min(b.len());
                    b = &b[skip..];
                    match len - skip as u32 {
                        0 => Self::next_field(left),
                        rest => St::Data(rest, left),
                    }
                }
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A binary COPY stream of `rows`, each a list of fields (`None`: NULL).
    fn binary(rows: &[Vec<Option<Vec<u8>>>]) -> Vec<u8> {
        let mut out = b"PGCOPY\n\xff\r\n\0".to_vec();
        out.extend_from_slice(&0u32.to_be_bytes());
        out.extend_from_slice(&4u32.to_be_bytes());
        out.extend_from_slice(b"xxxx");
        for r in rows {
            out.extend_from_slice(&(r.len() as i16).to_be_bytes());
            for f in r {
                match f {
                    None => out.extend_from_slice(&(-1i32).to_be_bytes()),
                    Some(v) => {
                        out.extend_from_slice(&(v.len() as i32).to_be_bytes());
                        out.extend_from_slice(v);
                    }
                }
            }
        }
        out.extend_from_slice(&(-1i16).to_be_bytes());
        out
    }

    #[test]
    fn text_rows_are_lines() {
        let mut c = RowCounter::new(false);
        c.feed(b"1\ta\\nb\n2\t");
        c.feed(b"\\N\n");
        assert_eq!(c.rows(), 2);
    }

    #[test]
    fn binary_rows_are_counted_whole_or_split_anywhere() {
        let rows = vec![
            vec![Some(b"abc".to_vec()), None, Some(vec![])],
            vec![],
            vec![Some(vec![0xff; 300])],
        ];
        let stream = binary(&rows);
        for split in 0..stream.len() {
            let mut c = RowCounter::new(true);
            c.feed(&stream[..split]);
            c.feed(&stream[split..]);
            assert_eq!(c.rows(), 3, "split at {split}");
        }
        // A byte at a time.
        let mut c = RowCounter::new(true);
        for b in &stream {
            c.feed(std::slice::from_ref(b));
        }
        assert_eq!(c.rows(), 3);
    }

    #[test]
    fn nothing_after_the_trailer_or_a_bad_signature_counts() {
        let mut stream = binary(&[vec![None]]);
        stream.extend_from_slice(&1i16.to_be_bytes());
        let mut c = RowCounter::new(true);
        c.feed(&stream);
        assert_eq!(c.rows(), 1);
        let mut c = RowCounter::new(true);
        c.feed(&[0u8; 64]);
        assert_eq!(c.rows(), 0);
    }

    proptest! {
        #[test]
        fn any_bytes_in_any_pieces_never_panic(data in proptest::collection::vec(any::<u8>(), 0..2048), cut in 0usize..2048) {
            for binary in [true, false] {
                let mut c = RowCounter::new(binary);
                let cut = cut.min(data.len());
                c.feed(&data[..cut]);
                c.feed(&data[cut..]);
            }
        }

        #[test]
        fn any_rows_are_counted(rows in proptest::collection::vec(
            proptest::collection::vec(proptest::option::of(proptest::collection::vec(any::<u8>(), 0..40)), 0..6), 0..30),
            cut in 0usize..4096)
        {
            let stream = binary(&rows);
            let cut = cut.min(stream.len());
            let mut c = RowCounter::new(true);
            c.feed(&stream[..cut]);
            c.feed(&stream[cut..]);
            prop_assert_eq!(c.rows(), rows.len() as u64);
        }
    }
}
