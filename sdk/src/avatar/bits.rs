//! Bit-level writing and reading for the avatar codec, on `bitstream-io`: fixed-width fields
//! and Exp-Golomb codes for the small numbers that deltas mostly are (a residual of 0 costs
//! one bit, ±1 three, ±2–3 five, and so on).

use std::io;

use bitstream_io::{BigEndian, BitRead, BitReader, BitWrite, BitWriter};

/// Longest Exp-Golomb prefix accepted: a value past 32 bits is not ours.
const MAX_PREFIX: u32 = 32;

/// Writes bits into a byte vector, most significant bit first.
pub(super) struct Writer {
    inner: BitWriter<Vec<u8>, BigEndian>,
    bits: u64,
}

impl Writer {
    pub(super) fn new() -> Writer {
        Writer { inner: BitWriter::endian(Vec::new(), BigEndian), bits: 0 }
    }

    /// Bits written so far.
    #[cfg(test)]
    pub(super) fn bits(&self) -> u64 {
        self.bits
    }

    // Writing into a Vec<u8> cannot fail; the io::Result is bitstream-io's signature for any
    // sink, and a failure here would be a bug in the widths this module passes.
    pub(super) fn bit(&mut self, b: bool) {
        self.bits += 1;
        let r = self.inner.write_bit(b);
        debug_assert!(r.is_ok());
    }

    /// `v` in `n` bits (0 to 32; values past `n` bits are a caller bug).
    pub(super) fn uint(&mut self, n: u32, v: u32) {
        debug_assert!(n == 32 || u64::from(v) < 1u64 << n, "{v} does not fit {n} bits");
        if n == 0 {
            return;
        }
        self.bits += u64::from(n);
        let r = self.inner.write_unsigned_var(n, v);
        debug_assert!(r.is_ok());
    }

    /// `v` as order-0 Exp-Golomb.
    pub(super) fn ue(&mut self, v: u32) {
        let x = u64::from(v) + 1;
        let n = 63 - x.leading_zeros();
        for _ in 0..n {
            self.bit(false);
        }
        self.bit(true);
        let rest = x & ((1u64 << n) - 1);
        self.uint(n, rest as u32);
    }

    /// `v` zigzagged (0, -1, 1, -2, 2 … to 0, 1, 2, 3, 4 …) as Exp-Golomb.
    pub(super) fn se(&mut self, v: i32) {
        self.ue(((v << 1) ^ (v >> 31)) as u32);
    }

    /// The bytes, the last one padded with zeros.
    pub(super) fn finish(mut self) -> Vec<u8> {
        let r = self.inner.byte_align();
        debug_assert!(r.is_ok());
        self.inner.into_writer()
    }
}

/// Reads what a [`Writer`] wrote; running past the end is an error, not a panic.
pub(super) struct Reader<'a> {
    inner: BitReader<&'a [u8], BigEndian>,
}

impl<'a> Reader<'a> {
    pub(super) fn new(bytes: &'a [u8]) -> Reader<'a> {
        Reader { inner: BitReader::endian(bytes, BigEndian) }
    }

    pub(super) fn bit(&mut self) -> io::Result<bool> {
        self.inner.read_bit()
    }

    pub(super) fn uint(&mut self, n: u32) -> io::Result<u32> {
        if n == 0 {
            return Ok(0);
        }
        self.inner.read_unsigned_var(n)
    }

    pub(super) fn ue(&mut self) -> io::Result<u32> {
        let mut n = 0;
        while !self.bit()? {
            n += 1;
            if n > MAX_PREFIX {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "Exp-Golomb prefix too long"));
            }
        }
        let rest = if n == 0 { 0 } else { u64::from(self.inner.read_unsigned_var::<u32>(n)?) };
        let x = (1u64 << n) | rest;
        u32::try_from(x - 1).map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "Exp-Golomb value past 32 bits"))
    }

    pub(super) fn se(&mut self) -> io::Result<i32> {
        let u = self.ue()?;
        Ok(((u >> 1) as i32) ^ -((u & 1) as i32))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_golomb_round_trips_and_costs_what_it_should() {
        let values = [0i32, 1, -1, 2, -2, 3, 100, -100, 65_535, i32::MAX, i32::MIN];
        let mut w = Writer::new();
        for v in values {
            w.se(v);
        }
        w.ue(u32::MAX);
        w.uint(11, 2047);
        let bytes = w.finish();
        let mut r = Reader::new(&bytes);
        for v in values {
            assert_eq!(r.se().ok(), Some(v));
        }
        assert_eq!(r.ue().ok(), Some(u32::MAX));
        assert_eq!(r.uint(11).ok(), Some(2047));
        let cost = |v: i32| {
            let mut w = Writer::new();
            w.se(v);
            w.bits()
        };
        assert_eq!([cost(0), cost(-1), cost(1), cost(-2), cost(2), cost(-4)], [1, 3, 3, 5, 5, 7]);
    }

    #[test]
    fn a_truncated_or_endless_code_is_an_error() {
        assert!(Reader::new(&[]).ue().is_err());
        assert!(Reader::new(&[0; 8]).ue().is_err());
        assert!(Reader::new(&[0b0000_0001]).ue().is_err());
    }
}
