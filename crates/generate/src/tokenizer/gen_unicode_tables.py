import unicodedata
def ranges(pred):
    out=[]; start=None
    for cp in range(0x110000):
        ok = pred(cp)
        if ok and start is None: start=cp
        if not ok and start is not None: out.append((start,cp-1)); start=None
    if start is not None: out.append((start,0x10FFFF))
    return out
L = ranges(lambda c: unicodedata.category(chr(c)).startswith('L'))
N = ranges(lambda c: unicodedata.category(chr(c)).startswith('N'))
def emit(name, rs, doc):
    s = f"/// {doc}\npub(crate) static {name}: &[(u32, u32)] = &[\n"
    line = "   "
    for a,b in rs:
        item = f" (0x{a:X}, 0x{b:X}),"
        if len(line)+len(item) > 99:
            s += line + "\n"; line = "   "
        line += item
    s += line + "\n];\n"
    return s
out = "//! Unicode general-category ranges used by the BPE pre-tokenizers.\n//!\n"
out += f"//! Generated from the Unicode Character Database {unicodedata.unidata_version} (Python's `unicodedata`)\n"
out += "//! by listing every code point whose general category starts with `L` (letters) or `N`\n//! (numbers) and merging consecutive code points into inclusive ranges. Sorted, disjoint.\n\n"
out += emit("LETTER_RANGES", L, "Inclusive ranges of code points in `\\p{L}` (Lu, Ll, Lt, Lm, Lo).")
out += "\n" + emit("NUMBER_RANGES", N, "Inclusive ranges of code points in `\\p{N}` (Nd, Nl, No).")
open('/work/main/crates/generate/src/tokenizer/unicode_tables.rs','w').write(out)
print(len(L), len(N))
