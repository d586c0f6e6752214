//! A walk over a GGUF header that checks every length, count, shape and offset against the bytes the file has,
//! before candle-core's reader runs. candle trusts the header: a metadata string whose length field says 2^61
//! aborts the process on allocation, an array of 2^60 elements panics with "capacity overflow", and a tensor shape
//! whose product wraps passes a naive "inside the file" check. This walk reads only fixed-size fields, skips over
//! strings and arrays (reading short ones into a sink, seeking past long ones) once it has checked that they are
//! inside the file, allocates nothing the header claims, and does all its arithmetic checked; what
//! it lets through, candle can read without trusting a length. The tensors' types and extents are checked after
//! candle's parse, in `GgufFile::check_tensors`.

use std::io::{Read, Seek, SeekFrom};

use crate::error::{EngineError, ExpectedBytes, Result};

/// ggml's limit on a tensor's dimensions.
const MAX_DIMS: u32 = 4;
/// Arrays of arrays deeper than this are refused (real files use none).
const MAX_DEPTH: usize = 4;

/// Checks the header of the GGUF file `reader` holds (`file_size` bytes, magic already checked). Leaves the
/// reader's position anywhere.
pub fn check_header<R: Read + Seek>(reader: &mut R, file_size: u64) -> Result<()> {
    let mut walk = Walk { reader, pos: 0, size: file_size, version: 0 };
    walk.fits(4)?;
    walk.reader.seek(SeekFrom::Start(4))?;
    walk.pos = 4;
    walk.version = walk.u32("the version")?;
    if !(1..=3).contains(&walk.version) {
        return Err(EngineError::InvalidRequest(format!(
            "unsupported GGUF version {}; versions 1 to 3 are read",
            walk.version
        )));
    }
    let tensor_count = walk.count("the tensor count")?;
    let kv_count = walk.count("the metadata count")?;
    // Each entry takes at least a length field and a type: more entries than that cannot be in the file.
    walk.at_most(kv_count, 12, "metadata entries")?;
    for _ in 0..kv_count {
        let key = walk.key()?;
        let value_type = walk.u32("a metadata value's type")?;
        if key.as_deref() == Some("general.alignment") {
            // candle divides by it: zero would panic.
            let alignment = match value_type {
                4 => walk.u32("general.alignment")? as u64,
                _ => return Err(walk.malformed("general.alignment is not a u32")),
            };
            if alignment == 0 || !alignment.is_power_of_two() {
                return Err(walk.malformed(&format!("general.alignment is {alignment}, not a power of two")));
            }
        } else {
            walk.value(value_type, 0)?;
        }
    }
    // Tensor entries: only what candle allocates by (the dimension count) or multiplies (the shape) is checked
    // here; types, whole blocks and where the data ends are `GgufFile::check_tensors`'s, on candle's parse.
    walk.at_most(tensor_count, 24, "tensors")?;
    for _ in 0..tensor_count {
        walk.skip_string("a tensor's name")?;
        let n_dims = walk.u32("a tensor's dimension count")?;
        if n_dims > MAX_DIMS {
            return Err(walk.malformed(&format!("a tensor has {n_dims} dimensions (ggml allows {MAX_DIMS})")));
        }
        let mut elements = 1u64;
        for _ in 0..n_dims {
            let dim = walk.count("a tensor dimension")?;
            elements = elements.checked_mul(dim).ok_or_else(|| walk.malformed("a tensor's shape overflows"))?;
        }
        walk.skip(4 + 8)?; // the type and the offset
    }
    Ok(())
}

struct Walk<'a, R> {
    reader: &'a mut R,
    pos: u64,
    size: u64,
    version: u32,
}

impl<R: Read + Seek> Walk<'_, R> {
    fn malformed(&self, what: &str) -> EngineError {
        EngineError::MalformedGguf { at: self.pos, what: what.into() }
    }

    fn left(&self) -> u64 {
        self.size.saturating_sub(self.pos)
    }

    /// The next `n` bytes must be in the file.
    fn fits(&self, n: u64) -> Result<()> {
        if n > self.left() {
            return Err(EngineError::Truncated {
                what: format!("it ends inside the header (a field at byte {} needs {n} bytes)", self.pos),
                actual: self.size,
                expected: ExpectedBytes(self.pos.checked_add(n)),
            });
        }
        Ok(())
    }

    /// Moves forward by `n` bytes, which must be in the file. Short skips read the bytes and drop them: a
    /// `BufReader` (the CLI's) discards its buffer at every seek, and seeking past each of Gemma 3's 262,144
    /// token strings, three seeks and a refill of the buffer per field, took a million system calls (`saif info`
    /// on Gemma: 0.50-0.93 s before, 0.12-0.50 s after; `strace -c`: 1,053,312 reads and seeks, then 1,838).
    fn skip(&mut self, n: u64) -> Result<()> {
        const SKIP_BY_READING: u64 = 1 << 16;
        self.fits(n)?;
        if n <= SKIP_BY_READING {
            let skipped = std::io::copy(&mut (&mut *self.reader).take(n), &mut std::io::sink())?;
            if skipped < n {
                return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
            }
        } else {
            self.reader.seek(SeekFrom::Start(self.pos + n))?;
        }
        self.pos += n;
        Ok(())
    }

    fn bytes<const N: usize>(&mut self) -> Result<[u8; N]> {
        self.fits(N as u64)?;
        let mut buf = [0u8; N];
        self.reader.read_exact(&mut buf)?;
        self.pos += N as u64;
        Ok(buf)
    }

    fn u32(&mut self, _what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.bytes()?))
    }

    /// A count or length: a u32 in version 1, a u64 after.
    fn count(&mut self, what: &str) -> Result<u64> {
        if self.version == 1 {
            Ok(self.u32(what)? as u64)
        } else {
            Ok(u64::from_le_bytes(self.bytes()?))
        }
    }

    /// `count` items of at least `min_bytes` each must fit in what is left: if they do not, the file is cut short
    /// (or the count is a lie, which the message shows by its size).
    fn at_most(&self, count: u64, min_bytes: u64, what: &str) -> Result<()> {
        match count.checked_mul(min_bytes) {
            Some(n) if n <= self.left() => Ok(()),
            Some(n) => Err(EngineError::Truncated {
                what: format!("the header lists {count} {what} at byte {}, which need at least {n} bytes", self.pos),
                actual: self.size,
                expected: ExpectedBytes(self.pos.checked_add(n)),
            }),
            None => Err(self.malformed(&format!("it lists {count} {what}"))),
        }
    }

    fn skip_string(&mut self, what: &str) -> Result<()> {
        let len = self.count(what)?;
        self.skip(len)
    }

    /// A metadata key: read only when it could be `general.alignment` (the one key this walk needs), else skipped.
    fn key(&mut self) -> Result<Option<String>> {
        const WANTED: &str = "general.alignment";
        let len = self.count("a metadata key")?;
        if len == WANTED.len() as u64 {
            let text: [u8; WANTED.len()] = self.bytes()?;
            return Ok(Some(String::from_utf8_lossy(&text).into_owned()));
        }
        self.skip(len)?;
        Ok(None)
    }

    /// The bytes of a fixed-size value type, None for strings and arrays.
    fn fixed_size(value_type: u32) -> Option<u64> {
        match value_type {
            0 | 1 | 7 => Some(1),
            2 | 3 => Some(2),
            4..=6 => Some(4),
            10..=12 => Some(8),
            _ => None,
        }
    }

    fn value(&mut self, value_type: u32, depth: usize) -> Result<()> {
        if let Some(n) = Self::fixed_size(value_type) {
            return self.skip(n);
        }
        match value_type {
            8 => self.skip_string("a metadata string"),
            9 => {
                if depth >= MAX_DEPTH {
                    return Err(self.malformed("arrays nested too deep"));
                }
                let element_type = self.u32("an array's element type")?;
                let count = self.count("an array's length")?;
                match Self::fixed_size(element_type) {
                    Some(n) => {
                        self.at_most(count, n, "array elements")?;
                        self.skip(count * n)
                    }
                    None if element_type == 8 || element_type == 9 => {
                        let min = if self.version == 1 { 4 } else { 8 };
                        self.at_most(count, min, "array elements")?;
                        for _ in 0..count {
                            self.value(element_type, depth + 1)?;
                        }
                        Ok(())
                    }
                    None => Err(self.malformed(&format!("unknown array element type {element_type}"))),
                }
            }
            other => Err(self.malformed(&format!("unknown metadata value type {other}"))),
        }
    }
}
