"""Security descriptor strings (SDDL): parsed into ACEs, compared by meaning, normalised as Windows.

Windows does not keep a security descriptor as the text it was given. It stores the binary form,
with generic rights mapped to the object's specific rights, and
ConvertSecurityDescriptorToStringSecurityDescriptor writes that back with well-known SIDs as their
aliases and masks as rights strings: ``(A;;GR;;;S-1-5-20)`` on a key file reads back as
``(A;;FR;;;NS)``. So whether an account can read a key is decided here on parsed ACEs (SID, type,
flags, mapped mask), never by comparing strings; :func:`normalise` produces the text Windows would
read back, for the fake backend.

The tables are sddl.h's and winnt.h's; the rendering rules (an exact right alias first, else
single-bit aliases from bit 0 up, else ``0x...``) are those of Windows' and Wine's converters.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

import attrs

__all__ = [
    "FILE_ALL_ACCESS",
    "FILE_GENERIC_READ",
    "Ace",
    "Descriptor",
    "canonical_sid",
    "map_generic",
    "normalise",
    "parse",
]

#: SDDL aliases of well-known SIDs that do not depend on a domain (sddl.h).
SID_ALIASES = {
    "AC": "S-1-15-2-1",
    "AN": "S-1-5-7",
    "AO": "S-1-5-32-548",
    "AU": "S-1-5-11",
    "BA": "S-1-5-32-544",
    "BG": "S-1-5-32-546",
    "BO": "S-1-5-32-551",
    "BU": "S-1-5-32-545",
    "CG": "S-1-3-1",
    "CO": "S-1-3-0",
    "CY": "S-1-5-32-569",
    "ED": "S-1-5-9",
    "ER": "S-1-5-32-573",
    "HI": "S-1-16-12288",
    "IS": "S-1-5-32-568",
    "IU": "S-1-5-4",
    "LS": "S-1-5-19",
    "LU": "S-1-5-32-559",
    "LW": "S-1-16-4096",
    "ME": "S-1-16-8192",
    "MU": "S-1-5-32-558",
    "NO": "S-1-5-32-556",
    "NS": "S-1-5-20",
    "NU": "S-1-5-2",
    "OW": "S-1-3-4",
    "PO": "S-1-5-32-550",
    "PS": "S-1-5-10",
    "PU": "S-1-5-32-547",
    "RC": "S-1-5-12",
    "RD": "S-1-5-32-555",
    "RE": "S-1-5-32-552",
    "RU": "S-1-5-32-554",
    "SI": "S-1-16-16384",
    "SO": "S-1-5-32-549",
    "SU": "S-1-5-6",
    "SY": "S-1-5-18",
    "WD": "S-1-1-0",
    "WR": "S-1-5-33",
}
_ALIAS_OF_SID = {sid: alias for alias, sid in SID_ALIASES.items()}

GENERIC_READ = 0x80000000  # winnt.h
GENERIC_WRITE = 0x40000000  # winnt.h
GENERIC_EXECUTE = 0x20000000  # winnt.h
GENERIC_ALL = 0x10000000  # winnt.h
FILE_GENERIC_READ = 0x00120089  # winnt.h (SDDL "FR")
FILE_GENERIC_WRITE = 0x00120116  # winnt.h (SDDL "FW")
FILE_GENERIC_EXECUTE = 0x001200A0  # winnt.h (SDDL "FX")
FILE_ALL_ACCESS = 0x001F01FF  # winnt.h (SDDL "FA")
#: How a key file maps generic rights (the KSP keeps keys as files): GENERIC_MAPPING of files.
_FILE_MAPPING = (
    (GENERIC_READ, FILE_GENERIC_READ),
    (GENERIC_WRITE, FILE_GENERIC_WRITE),
    (GENERIC_EXECUTE, FILE_GENERIC_EXECUTE),
    (GENERIC_ALL, FILE_ALL_ACCESS),
)
_GENERIC_BITS = GENERIC_READ | GENERIC_WRITE | GENERIC_EXECUTE | GENERIC_ALL

#: Rights aliases that name a whole mask, in the order the converter tries them (sddl.h).
_MASK_ALIASES = (
    ("GA", GENERIC_ALL),
    ("GR", GENERIC_READ),
    ("GW", GENERIC_WRITE),
    ("GX", GENERIC_EXECUTE),
    ("FA", FILE_ALL_ACCESS),
    ("FR", FILE_GENERIC_READ),
    ("FW", FILE_GENERIC_WRITE),
    ("FX", FILE_GENERIC_EXECUTE),
    ("KA", 0x000F003F),  # KEY_ALL_ACCESS
    ("KR", 0x00020019),  # KEY_READ
    ("KW", 0x00020006),  # KEY_WRITE
    ("KX", 0x00020019),  # KEY_EXECUTE (the same bits as KEY_READ)
)
#: Single-bit rights aliases by bit, written from bit 0 up (sddl.h; winnt.h and iads.h values).
_BIT_ALIASES = {
    0x00000001: "CC",
    0x00000002: "DC",
    0x00000004: "LC",
    0x00000008: "SW",
    0x00000010: "RP",
    0x00000020: "WP",
    0x00000040: "DT",
    0x00000080: "LO",
    0x00000100: "CR",
    0x00010000: "SD",
    0x00020000: "RC",
    0x00040000: "WD",
    0x00080000: "WO",
    0x10000000: "GA",
    0x20000000: "GX",
    0x40000000: "GW",
    0x80000000: "GR",
}
_RIGHTS = {**{alias: bit for bit, alias in _BIT_ALIASES.items()}, **dict(_MASK_ALIASES)}
#: ACE flags in the order Windows writes them ("OICIID").
_ACE_FLAGS = ("OI", "CI", "NP", "IO", "ID", "SA", "FA")
#: DACL flags in the order Windows writes them ("PAI").
_DACL_FLAGS = ("P", "AR", "AI")
_ACE_TYPES = frozenset(
    {"A", "D", "OA", "OD", "AU", "AL", "OU", "OL", "ML", "XA", "XD", "XU", "ZA", "RA", "SP"}
)
_SID = re.compile(r"S-1-\d+(-\d+)*")
_NULL_DACL = "NO_ACCESS_CONTROL"


def canonical_sid(text: str) -> str:
    """A SID as ``S-1-...`` (an alias resolved); domain-relative aliases stay aliases."""
    sid = text.strip().upper()
    if sid in SID_ALIASES:
        return SID_ALIASES[sid]
    if _SID.fullmatch(sid) or re.fullmatch(r"[A-Z]{2}", sid):
        return sid
    raise ValueError(f"{text!r} is not a SID or an SDDL SID alias")


def map_generic(mask: int) -> int:
    """``mask`` with generic rights replaced by the specific rights of a (key) file."""
    for generic, specific in _FILE_MAPPING:
        if mask & generic:
            mask = (mask & ~generic) | specific
    return mask


def _rights_mask(text: str) -> int:
    value = text.strip().upper()
    if not value:
        return 0
    if value.startswith("0X"):
        return int(value, 16)
    if value.isdigit():
        return int(value)
    if len(value) % 2:
        raise ValueError(f"access rights {text!r} are not two-letter aliases")
    mask = 0
    for index in range(0, len(value), 2):
        alias = value[index : index + 2]
        if alias not in _RIGHTS:
            raise ValueError(f"unknown access right {alias!r} in {text!r}")
        mask |= _RIGHTS[alias]
    return mask


def _rights_text(mask: int) -> str:
    if mask == 0:
        return ""
    for alias, value in _MASK_ALIASES:
        if value == mask:
            return alias
    bits = [1 << index for index in range(32) if mask & (1 << index)]
    if all(bit in _BIT_ALIASES for bit in bits):
        return "".join(_BIT_ALIASES[bit] for bit in bits)
    return f"0x{mask:x}"


def _sid_text(sid: str) -> str:
    return _ALIAS_OF_SID.get(sid, sid)


def _tokens(text: str, known: Sequence[str], what: str) -> frozenset[str]:
    value = text.strip().upper()
    found: set[str] = set()
    index = 0
    while index < len(value):
        token = next((t for t in known if value.startswith(t, index)), None)
        if token is None:
            raise ValueError(f"unknown {what} {value[index:]!r} in {text!r}")
        found.add(token)
        index += len(token)
    return frozenset(found)


@attrs.frozen
class Ace:
    """One ACE: its type, flags, access mask and trustee, and the text it was read from."""

    type: str
    flags: frozenset[str]
    mask: int
    sid: str  # canonical: "S-1-5-20", never "NS"
    text: str

    @classmethod
    def parse(cls, text: str) -> Ace:
        """An ACE from ``(type;flags;rights;object;inherit object;sid[;condition])``."""
        if not (text.startswith("(") and text.endswith(")")):
            raise ValueError(f"ACE {text!r} is not in parentheses")
        fields = text[1:-1].split(";", 6)
        if len(fields) < 6:
            raise ValueError(f"ACE {text!r} has {len(fields)} fields, not 6")
        kind = fields[0].strip().upper()
        if kind not in _ACE_TYPES:
            raise ValueError(f"ACE {text!r} has an unknown type {fields[0]!r}")
        try:
            flags = _tokens(fields[1], _ACE_FLAGS, "ACE flag")
            mask = _rights_mask(fields[2])
            sid = canonical_sid(fields[5])
        except ValueError as error:
            raise ValueError(f"ACE {text!r}: {error}") from None
        return cls(kind, flags, mask, sid, text)

    @property
    def inherited(self) -> bool:
        """Inherited from a parent (ID), rather than set on the object itself."""
        return "ID" in self.flags

    @property
    def effective_mask(self) -> int:
        """The rights this ACE allows or denies on the object itself (generic rights mapped)."""
        return 0 if "IO" in self.flags else map_generic(self.mask)

    def normalised(self) -> Ace:
        """This ACE as Windows reads it back: generic rights mapped, SID as its alias."""
        mask = self.mask if "IO" in self.flags else map_generic(self.mask)
        fields = self.text[1:-1].split(";", 6)
        fields[0] = self.type
        fields[1] = "".join(flag for flag in _ACE_FLAGS if flag in self.flags)
        fields[2] = _rights_text(mask)
        fields[5] = _sid_text(self.sid)
        return attrs.evolve(self, mask=mask, text=f"({';'.join(fields)})")


@attrs.frozen
class Descriptor:
    """A security descriptor string, with its DACL parsed and the rest kept as it was."""

    prefix: str  # owner and group, before "D:"
    flags: frozenset[str]
    null_dacl: bool
    aces: tuple[Ace, ...]
    suffix: str  # the SACL, after the DACL

    def text(self) -> str:
        """The descriptor as SDDL, every ACE as its own text."""
        flags = "".join(flag for flag in _DACL_FLAGS if flag in self.flags)
        null = _NULL_DACL if self.null_dacl else ""
        return f"{self.prefix}D:{flags}{null}{''.join(a.text for a in self.aces)}{self.suffix}"

    def allowed(self, sid: str) -> int:
        """The rights the DACL gives ``sid`` on the key itself: its allow ACEs minus its deny ACEs.

        Only ACEs naming ``sid`` count (not its groups'); a deny wins wherever it stands, as it
        does in a DACL in canonical order.
        """
        wanted = canonical_sid(sid)
        allow = deny = 0
        for ace in self.aces:
            if ace.sid == wanted and ace.type == "A":
                allow |= ace.effective_mask
            elif ace.sid == wanted and ace.type == "D":
                deny |= ace.effective_mask
        return allow & ~deny

    def grants(self, sid: str, rights: int) -> bool:
        """Whether the DACL gives ``sid`` all of ``rights`` (a NULL DACL gives everyone all)."""
        return self.null_dacl or self.allowed(sid) & rights == rights

    def with_explicit(self, aces: Iterable[Ace]) -> Descriptor:
        """This descriptor with ``aces`` after the explicit ACEs and before inherited ones."""
        position = next((i for i, ace in enumerate(self.aces) if ace.inherited), len(self.aces))
        added = tuple(aces)
        return attrs.evolve(self, aces=self.aces[:position] + added + self.aces[position:])


def parse(sddl: str) -> Descriptor:
    """Parse ``sddl``; ValueError names what is malformed."""
    start = _dacl_start(sddl)
    index = start + 2
    while index < len(sddl) and sddl[index] != "(" and not sddl.startswith("S:", index):
        index += 1
    flag_text = sddl[start + 2 : index]
    null_dacl = _NULL_DACL in flag_text.upper()
    try:
        flags = _tokens(flag_text.upper().replace(_NULL_DACL, ""), _DACL_FLAGS, "DACL flag")
    except ValueError as error:
        raise ValueError(f"security descriptor {sddl!r}: {error}") from None
    aces: list[Ace] = []
    while index < len(sddl) and sddl[index] == "(":
        end = _closing(sddl, index)
        try:
            aces.append(Ace.parse(sddl[index : end + 1]))
        except ValueError as error:
            raise ValueError(f"security descriptor {sddl!r}: {error}") from None
        index = end + 1
    rest = sddl[index:]
    if rest and not rest.startswith("S:"):
        raise ValueError(f"security descriptor {sddl!r}: unexpected {rest!r} after the DACL")
    return Descriptor(sddl[:start], flags, null_dacl, tuple(aces), rest)


def normalise(sddl: str) -> str:
    """``sddl`` as Windows stores a key's descriptor and reads it back."""
    descriptor = parse(sddl)
    aces = tuple(ace.normalised() for ace in descriptor.aces)
    return attrs.evolve(descriptor, aces=aces).text()


def _dacl_start(sddl: str) -> int:
    depth = 0
    for index, char in enumerate(sddl):
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        elif depth == 0 and sddl.startswith("D:", index) and _at_component(sddl, index):
            return index
    raise ValueError(f"the security descriptor has no DACL: {sddl!r}")


def _at_component(sddl: str, index: int) -> bool:
    # "O:DD" (owner: domain controllers) contains "D:"-looking text only as part of a SID: a DACL
    # starts the string or follows a complete owner or group component.
    if index == 0:
        return True
    before = sddl[:index]
    match = re.fullmatch(r"(O:[^:()]+?)?(G:[^:()]+?)?", before)
    if match is None:
        return False
    return all(_is_sid(part[2:]) for part in match.groups() if part)


def _is_sid(text: str) -> bool:
    try:
        canonical_sid(text)
    except ValueError:
        return False
    return True


def _closing(sddl: str, index: int) -> int:
    depth = 0
    for end in range(index, len(sddl)):
        depth += {"(": 1, ")": -1}.get(sddl[end], 0)
        if depth == 0:
            return end
    raise ValueError(f"unbalanced parentheses in security descriptor {sddl!r}")
