//! serde `Deserializer` over [`Node`]s with located errors.
//!
//! Scalars are strict, like Kubernetes: a plain `80` is not a string and a quoted `"80"` is not
//! an integer. `deserialize_any` reports each node's natural type. A `null` is accepted as an
//! empty sequence or mapping (as Go's decoder treats `null` for slices, maps and structs).
//!
//! Errors start "unlocated" (from serde's `Error::custom` and friends) and are attached to the
//! node being deserialized where a node is entered (the top level, each map key, map value,
//! sequence item and enum variant); errors that are already located are passed through, so the
//! most specific node wins.

use std::borrow::Cow;
use std::fmt;

use serde::de::{
    self, DeserializeOwned, DeserializeSeed, EnumAccess, IntoDeserializer, MapAccess, SeqAccess,
    Unexpected, VariantAccess, Visitor,
};

use super::{push_index, push_key, quote_truncated, Node, SourceError, Value};

/// Deserializes `node` as `T`. `base_path` (may be empty) is prefixed to the field paths in
/// errors, e.g. `items[3]` gives `items[3].spec.podSelector`.
pub fn from_node<T: DeserializeOwned>(node: &Node, base_path: &str) -> Result<T, SourceError> {
    let path = Path {
        parent: None,
        seg: Seg::Root(base_path),
    };
    let de = NodeDe { node, path: &path };
    T::deserialize(de).map_err(|e| match de.locate(e) {
        Error::Located(e) => e,
        Error::Unlocated(message) => SourceError {
            pos: node.pos,
            path: path.render(),
            message,
        },
    })
}

/// Internal error: either not yet attached to a node, or final.
#[derive(Debug)]
pub(crate) enum Error {
    Unlocated(String),
    Located(SourceError),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Unlocated(m) => f.write_str(m),
            Error::Located(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for Error {}

fn expected_list(expected: &'static [&'static str]) -> String {
    match expected {
        [] => "there are none".to_owned(),
        [one] => format!("expected {one:?}"),
        _ => {
            let names: Vec<String> = expected.iter().map(|n| format!("{n:?}")).collect();
            format!("expected one of {}", names.join(", "))
        }
    }
}

fn describe_unexpected(u: &Unexpected<'_>) -> String {
    match u {
        Unexpected::Bool(b) => format!("boolean {b}"),
        Unexpected::Unsigned(n) => format!("integer {n}"),
        Unexpected::Signed(n) => format!("integer {n}"),
        Unexpected::Float(f) => format!("float {f}"),
        Unexpected::Char(c) => format!("character {c:?}"),
        Unexpected::Str(s) => format!("string {}", quote_truncated(s)),
        Unexpected::Bytes(_) => "bytes".to_owned(),
        Unexpected::Unit => "null".to_owned(),
        Unexpected::Option => "optional value".to_owned(),
        Unexpected::NewtypeStruct => "newtype struct".to_owned(),
        Unexpected::Seq => "sequence".to_owned(),
        Unexpected::Map => "mapping".to_owned(),
        Unexpected::Enum => "enum".to_owned(),
        Unexpected::UnitVariant => "unit variant".to_owned(),
        Unexpected::NewtypeVariant => "newtype variant".to_owned(),
        Unexpected::TupleVariant => "tuple variant".to_owned(),
        Unexpected::StructVariant => "struct variant".to_owned(),
        Unexpected::Other(other) => (*other).to_owned(),
    }
}

impl de::Error for Error {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        Error::Unlocated(msg.to_string())
    }

    fn invalid_type(unexp: Unexpected<'_>, exp: &dyn de::Expected) -> Self {
        Error::Unlocated(format!(
            "expected {exp}, found {}",
            describe_unexpected(&unexp)
        ))
    }

    fn invalid_value(unexp: Unexpected<'_>, exp: &dyn de::Expected) -> Self {
        Error::Unlocated(format!(
            "invalid value {}, expected {exp}",
            describe_unexpected(&unexp)
        ))
    }

    fn invalid_length(len: usize, exp: &dyn de::Expected) -> Self {
        Error::Unlocated(format!("invalid length {len}, expected {exp}"))
    }

    fn unknown_variant(variant: &str, expected: &'static [&'static str]) -> Self {
        Error::Unlocated(format!(
            "unknown variant {}, {}",
            quote_truncated(variant),
            expected_list(expected)
        ))
    }

    fn unknown_field(field: &str, expected: &'static [&'static str]) -> Self {
        Error::Unlocated(format!(
            "unknown field {}, {}",
            quote_truncated(field),
            expected_list(expected)
        ))
    }

    fn missing_field(field: &'static str) -> Self {
        Error::Unlocated(format!("missing field {field:?}"))
    }

    fn duplicate_field(field: &'static str) -> Self {
        Error::Unlocated(format!("duplicate field {field:?}"))
    }
}

/// A field path as a linked list through the deserializer's stack frames (no allocation unless
/// an error is rendered).
#[derive(Clone, Copy)]
enum Seg<'a> {
    Root(&'a str),
    Key(&'a str),
    Index(usize),
}

struct Path<'a> {
    parent: Option<&'a Path<'a>>,
    seg: Seg<'a>,
}

impl Path<'_> {
    fn render(&self) -> String {
        let mut segs = Vec::new();
        let mut cur = Some(self);
        while let Some(p) = cur {
            segs.push(p.seg);
            cur = p.parent;
        }
        let mut out = String::new();
        for seg in segs.iter().rev() {
            match *seg {
                Seg::Root(base) => out.push_str(base),
                Seg::Key(k) => push_key(&mut out, k),
                Seg::Index(i) => push_index(&mut out, i),
            }
        }
        out
    }
}

/// Short description of a node's type and value for error messages.
fn describe(node: &Node) -> String {
    match &node.value {
        Value::Null => "null".to_owned(),
        Value::Bool(b) => format!("boolean {b}"),
        Value::Int(_) | Value::Float(_) => {
            format!("{} {}", node.type_name(), node.key_text())
        }
        Value::Str(s) => format!("string {}", quote_truncated(s)),
        Value::Seq(_) => "sequence".to_owned(),
        Value::Map(_) => "mapping".to_owned(),
    }
}

static NO_ITEMS: [Node; 0] = [];
static NO_ENTRIES: [(Node, Node); 0] = [];

#[derive(Clone, Copy)]
struct NodeDe<'a> {
    node: &'a Node,
    path: &'a Path<'a>,
}

impl NodeDe<'_> {
    /// Attaches an unlocated error to this node.
    fn locate(self, e: Error) -> Error {
        match e {
            Error::Unlocated(message) => Error::Located(SourceError {
                pos: self.node.pos,
                path: self.path.render(),
                message,
            }),
            located @ Error::Located(_) => located,
        }
    }

    fn mismatch(self, expected: &str) -> Error {
        Error::Unlocated(format!(
            "expected {expected}, found {}",
            describe(self.node)
        ))
    }

    fn int(self, ty: &str) -> Result<i64, Error> {
        match self.node.value {
            Value::Int(i) => Ok(i),
            _ => Err(self.mismatch(&format!("an integer ({ty})"))),
        }
    }

    fn float(self) -> Result<f64, Error> {
        match self.node.value {
            #[allow(clippy::cast_precision_loss)]
            Value::Int(i) => Ok(i as f64),
            Value::Float(f) => Ok(f),
            _ => Err(self.mismatch("a number")),
        }
    }

    fn seq<'de, V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        let items: &[Node] = match &self.node.value {
            Value::Seq(items) => items,
            Value::Null => &NO_ITEMS,
            _ => return Err(self.mismatch("a sequence")),
        };
        let mut access = SeqDe {
            iter: items.iter().enumerate(),
            path: self.path,
        };
        let value = visitor.visit_seq(&mut access)?;
        let remaining = access.iter.len();
        if remaining > 0 {
            let used = items.len() - remaining;
            return Err(de::Error::invalid_length(
                items.len(),
                &format!("{used} element(s)").as_str(),
            ));
        }
        Ok(value)
    }

    fn map<'de, V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        let entries: &[(Node, Node)] = match &self.node.value {
            Value::Map(entries) => entries,
            Value::Null => &NO_ENTRIES,
            _ => return Err(self.mismatch("a mapping")),
        };
        let mut access = MapDe {
            iter: entries.iter(),
            value: None,
            path: self.path,
        };
        let value = visitor.visit_map(&mut access)?;
        let remaining = access.iter.len();
        if remaining > 0 {
            let used = entries.len() - remaining;
            return Err(de::Error::invalid_length(
                entries.len(),
                &format!("{used} entries").as_str(),
            ));
        }
        Ok(value)
    }
}

macro_rules! de_int {
    ($($method:ident => $ty:ty, $visit:ident;)*) => {$(
        fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
            let i = self.int(stringify!($ty))?;
            match <$ty>::try_from(i) {
                Ok(v) => visitor.$visit(v),
                Err(_) => Err(Error::Unlocated(format!(
                    "integer {i} is out of range for {} ({}..={})",
                    stringify!($ty),
                    <$ty>::MIN,
                    <$ty>::MAX
                ))),
            }
        }
    )*};
}

impl<'de> de::Deserializer<'de> for NodeDe<'_> {
    type Error = Error;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        match &self.node.value {
            Value::Null => visitor.visit_unit(),
            Value::Bool(b) => visitor.visit_bool(*b),
            Value::Int(i) => visitor.visit_i64(*i),
            Value::Float(f) => visitor.visit_f64(*f),
            Value::Str(s) => visitor.visit_str(s),
            Value::Seq(_) => self.seq(visitor),
            Value::Map(_) => self.map(visitor),
        }
    }

    fn deserialize_bool<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        match self.node.value {
            Value::Bool(b) => visitor.visit_bool(b),
            _ => Err(self.mismatch("a boolean")),
        }
    }

    de_int! {
        deserialize_i8 => i8, visit_i8;
        deserialize_i16 => i16, visit_i16;
        deserialize_i32 => i32, visit_i32;
        deserialize_i64 => i64, visit_i64;
        deserialize_i128 => i128, visit_i128;
        deserialize_u8 => u8, visit_u8;
        deserialize_u16 => u16, visit_u16;
        deserialize_u32 => u32, visit_u32;
        deserialize_u64 => u64, visit_u64;
        deserialize_u128 => u128, visit_u128;
    }

    fn deserialize_f32<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_f32(self.float()? as f32)
    }

    fn deserialize_f64<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_f64(self.float()?)
    }

    fn deserialize_char<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        if let Value::Str(s) = &self.node.value {
            let mut chars = s.chars();
            if let (Some(c), None) = (chars.next(), chars.next()) {
                return visitor.visit_char(c);
            }
        }
        Err(self.mismatch("a single character"))
    }

    fn deserialize_str<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        match &self.node.value {
            Value::Str(s) => visitor.visit_str(s),
            _ => Err(self.mismatch("a string")),
        }
    }

    fn deserialize_string<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        self.deserialize_str(visitor)
    }

    fn deserialize_bytes<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        self.deserialize_any(visitor)
    }

    fn deserialize_byte_buf<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        self.deserialize_any(visitor)
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        match self.node.value {
            Value::Null => visitor.visit_none(),
            _ => visitor.visit_some(self),
        }
    }

    fn deserialize_unit<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        match self.node.value {
            Value::Null => visitor.visit_unit(),
            _ => Err(self.mismatch("null")),
        }
    }

    fn deserialize_unit_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, Error> {
        self.deserialize_unit(visitor)
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, Error> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        self.seq(visitor)
    }

    fn deserialize_tuple<V: Visitor<'de>>(
        self,
        _len: usize,
        visitor: V,
    ) -> Result<V::Value, Error> {
        self.seq(visitor)
    }

    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _len: usize,
        visitor: V,
    ) -> Result<V::Value, Error> {
        self.seq(visitor)
    }

    fn deserialize_map<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        self.map(visitor)
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Error> {
        self.map(visitor)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        name: &'static str,
        _variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Error> {
        match &self.node.value {
            Value::Str(s) => {
                let de: de::value::StrDeserializer<'_, Error> = s.as_str().into_deserializer();
                visitor.visit_enum(de)
            }
            Value::Map(entries) => match entries.as_slice() {
                [(key, value)] => visitor.visit_enum(EnumDe {
                    key,
                    value,
                    path: self.path,
                }),
                _ => Err(self.mismatch(&format!(
                    "a string or a mapping with a single key (enum {name})"
                ))),
            },
            _ => Err(self.mismatch(&format!("a string (enum {name})"))),
        }
    }

    fn deserialize_identifier<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        self.deserialize_str(visitor)
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_unit()
    }
}

/// Deserializer for a mapping key: presents scalar keys as their text (so `80:` is the string
/// "80" for a `BTreeMap<String, _>` or a field name); non-string requests go to the node.
#[derive(Clone, Copy)]
struct KeyDe<'a> {
    node: NodeDe<'a>,
}

impl KeyDe<'_> {
    fn text<'de, V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        let node = self.node.node;
        if node.is_scalar() {
            visitor.visit_str(&node.key_text())
        } else {
            Err(self.node.mismatch("a scalar mapping key"))
        }
    }
}

macro_rules! forward_to_node {
    ($($method:ident ( $($arg:ident : $ty:ty),* );)*) => {$(
        fn $method<V: Visitor<'de>>(self, $($arg: $ty,)* visitor: V) -> Result<V::Value, Error> {
            self.node.$method($($arg,)* visitor)
        }
    )*};
}

impl<'de> de::Deserializer<'de> for KeyDe<'_> {
    type Error = Error;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        self.text(visitor)
    }

    fn deserialize_str<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        self.text(visitor)
    }

    fn deserialize_string<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        self.text(visitor)
    }

    fn deserialize_identifier<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        self.text(visitor)
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_some(self)
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, Error> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_unit()
    }

    forward_to_node! {
        deserialize_bool();
        deserialize_i8();
        deserialize_i16();
        deserialize_i32();
        deserialize_i64();
        deserialize_i128();
        deserialize_u8();
        deserialize_u16();
        deserialize_u32();
        deserialize_u64();
        deserialize_u128();
        deserialize_f32();
        deserialize_f64();
        deserialize_char();
        deserialize_bytes();
        deserialize_byte_buf();
        deserialize_unit();
        deserialize_unit_struct(name: &'static str);
        deserialize_seq();
        deserialize_tuple(len: usize);
        deserialize_tuple_struct(name: &'static str, len: usize);
        deserialize_map();
        deserialize_struct(name: &'static str, fields: &'static [&'static str]);
        deserialize_enum(name: &'static str, variants: &'static [&'static str]);
    }
}

struct SeqDe<'a> {
    iter: std::iter::Enumerate<std::slice::Iter<'a, Node>>,
    path: &'a Path<'a>,
}

impl<'de> SeqAccess<'de> for SeqDe<'_> {
    type Error = Error;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, Error> {
        let Some((index, node)) = self.iter.next() else {
            return Ok(None);
        };
        let path = Path {
            parent: Some(self.path),
            seg: Seg::Index(index),
        };
        let de = NodeDe { node, path: &path };
        seed.deserialize(de).map(Some).map_err(|e| de.locate(e))
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.iter.len())
    }
}

struct MapDe<'a> {
    iter: std::slice::Iter<'a, (Node, Node)>,
    /// Value of the last key returned, with the key's text.
    value: Option<(&'a Node, Cow<'a, str>)>,
    path: &'a Path<'a>,
}

impl<'de> MapAccess<'de> for MapDe<'_> {
    type Error = Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, Error> {
        let Some((key, value)) = self.iter.next() else {
            return Ok(None);
        };
        let text = key.key_text();
        let result = {
            let path = Path {
                parent: Some(self.path),
                seg: Seg::Key(&text),
            };
            let node = NodeDe {
                node: key,
                path: &path,
            };
            seed.deserialize(KeyDe { node })
                .map_err(|e| node.locate(e))?
        };
        self.value = Some((value, text));
        Ok(Some(result))
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, Error> {
        let Some((node, text)) = self.value.take() else {
            return Err(Error::Unlocated(
                "internal error: mapping value requested before its key".into(),
            ));
        };
        let path = Path {
            parent: Some(self.path),
            seg: Seg::Key(&text),
        };
        let de = NodeDe { node, path: &path };
        seed.deserialize(de).map_err(|e| de.locate(e))
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.iter.len())
    }
}

/// An externally tagged enum written as a single-key mapping `{Variant: value}`.
struct EnumDe<'a> {
    key: &'a Node,
    value: &'a Node,
    path: &'a Path<'a>,
}

impl<'de, 'a> EnumAccess<'de> for EnumDe<'a> {
    type Error = Error;
    type Variant = VariantDe<'a>;

    fn variant_seed<T: DeserializeSeed<'de>>(
        self,
        seed: T,
    ) -> Result<(T::Value, VariantDe<'a>), Error> {
        let text = self.key.key_text();
        let result = {
            let path = Path {
                parent: Some(self.path),
                seg: Seg::Key(&text),
            };
            let node = NodeDe {
                node: self.key,
                path: &path,
            };
            seed.deserialize(KeyDe { node })
                .map_err(|e| node.locate(e))?
        };
        Ok((
            result,
            VariantDe {
                value: self.value,
                key: text,
                path: self.path,
            },
        ))
    }
}

struct VariantDe<'a> {
    value: &'a Node,
    key: Cow<'a, str>,
    path: &'a Path<'a>,
}

impl VariantDe<'_> {
    fn with_node<R>(&self, f: impl FnOnce(NodeDe<'_>) -> Result<R, Error>) -> Result<R, Error> {
        let path = Path {
            parent: Some(self.path),
            seg: Seg::Key(&self.key),
        };
        let de = NodeDe {
            node: self.value,
            path: &path,
        };
        f(de).map_err(|e| de.locate(e))
    }
}

impl<'de> VariantAccess<'de> for VariantDe<'_> {
    type Error = Error;

    fn unit_variant(self) -> Result<(), Error> {
        self.with_node(|de| match de.node.value {
            Value::Null => Ok(()),
            _ => Err(de.mismatch("null (unit variant)")),
        })
    }

    fn newtype_variant_seed<T: DeserializeSeed<'de>>(self, seed: T) -> Result<T::Value, Error> {
        self.with_node(|de| seed.deserialize(de))
    }

    fn tuple_variant<V: Visitor<'de>>(self, _len: usize, visitor: V) -> Result<V::Value, Error> {
        self.with_node(|de| de.seq(visitor))
    }

    fn struct_variant<V: Visitor<'de>>(
        self,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Error> {
        self.with_node(|de| de.map(visitor))
    }
}
