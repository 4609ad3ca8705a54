//! The machinery behind the one list of node settings (in `config/mod.rs`).
//!
//! [`declare_settings!`] turns each declaration (doc, key, type, default,
//! flag form, secrecy) into a field of `NodeConfig`, its default, its TOML
//! key (serde), a [`Setting`] row that the command line and the reference
//! are built from, and a `Debug` that redacts secrets. Nothing here knows
//! about clap: the binary builds its flags from the rows.
//!
//! Invariants: a setting's key is its TOML key and, with `_` turned into
//! `-`, its flag unless its [`Flag`] names another; every setting has a doc
//! (the macro refuses one without); a secret's value never reaches `Debug`.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;

/// How a setting is given on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flag {
    /// `--key VALUE`.
    Value,
    /// `--key VALUE`, or this environment variable when the flag is absent
    /// (it still overrides the file).
    Env(&'static str),
    /// `--key A,B,...` (repeatable): a list whose items look like this
    /// placeholder (`IP:PORT`).
    List(&'static str),
    /// A switch of this name that sets a boolean to the opposite of its default.
    Switch(&'static str),
    /// `--NAME PATH`: the value is the file's text, surrounding whitespace
    /// trimmed, so that a secret never shows in the process list.
    SecretFile(&'static str),
    /// `--NAME PATH`: one entry per non-empty line of the file.
    SecretLines(&'static str),
    /// Only in the TOML file.
    FileOnly,
}

/// One setting as the command line and the reference see it.
#[derive(Debug, Clone)]
pub struct Setting {
    /// The TOML key and `NodeConfig` field.
    pub key: &'static str,
    /// What the setting does, as written above its declaration.
    pub doc: &'static str,
    /// The type in words (what the file and the flag take).
    pub kind: String,
    /// The placeholder of one flag value (`IP:PORT`, `N`).
    pub placeholder: &'static str,
    /// The default as a flag would spell it; `None` when unset or empty.
    pub default: Option<String>,
    pub flag: Flag,
    pub secret: bool,
    /// Parses one flag value and throws it away: the command line's check.
    pub check: fn(&str) -> Result<(), String>,
}

impl Setting {
    /// The row of a setting of type `T`. A list flag names the shape of its
    /// items itself (`IP:PORT`), since the items may be plain strings.
    pub fn of<T: SettingValue>(key: &'static str, doc: &'static str, default: &T, flag: Flag, secret: bool) -> Setting {
        let (kind, placeholder) = match flag {
            Flag::List(item) => (format!("list of strings ({item})"), item),
            _ => (T::kind(), T::placeholder()),
        };
        let check: fn(&str) -> Result<(), String> = |s| T::from_flag(&[s.to_string()]).map(drop);
        Setting { key, doc, kind, placeholder, default: default.render(), flag, secret, check }
    }

    /// The flag's name without dashes, or `None` for a setting only the file sets.
    pub fn flag_name(&self) -> Option<String> {
        match self.flag {
            Flag::Value | Flag::Env(_) | Flag::List(_) => Some(self.key.replace('_', "-")),
            Flag::Switch(name) | Flag::SecretFile(name) | Flag::SecretLines(name) => Some(name.to_string()),
            Flag::FileOnly => None,
        }
    }

    /// What a [`Flag::Switch`] sets its boolean to: the opposite of the default.
    pub fn switched_value(&self) -> &'static str {
        if self.default.as_deref() == Some("true") {
            "false"
        } else {
            "true"
        }
    }

    /// The doc as one line (the declaration wraps it over several).
    pub fn doc_line(&self) -> String {
        self.doc.split_whitespace().collect::<Vec<_>>().join(" ")
    }
}

/// A value one flag argument can hold.
pub trait Scalar: Sized {
    const KIND: &'static str;
    const PLACEHOLDER: &'static str;
    fn parse(s: &str) -> Result<Self, String>;
    fn render(&self) -> String;
}

macro_rules! scalar_from_str {
    ($($ty:ty => $kind:literal, $placeholder:literal, $expected:literal;)*) => {$(
        impl Scalar for $ty {
            const KIND: &'static str = $kind;
            const PLACEHOLDER: &'static str = $placeholder;
            fn parse(s: &str) -> Result<Self, String> {
                s.trim().parse().map_err(|_| format!("{s:?} is not {}", $expected))
            }
            fn render(&self) -> String {
                self.to_string()
            }
        }
    )*};
}

scalar_from_str! {
    u16 => "integer", "N", "a whole number up to 65535";
    u32 => "integer", "N", "a whole number up to 4294967295";
    u64 => "integer", "N", "a whole number";
    usize => "integer", "N", "a whole number";
    f64 => "float", "X", "a number";
    bool => "boolean", "BOOL", "true or false";
    SocketAddr => "string (IP:PORT)", "IP:PORT", "an IP:PORT address";
}

impl Scalar for String {
    const KIND: &'static str = "string";
    const PLACEHOLDER: &'static str = "TEXT";
    fn parse(s: &str) -> Result<Self, String> {
        Ok(s.to_string())
    }
    fn render(&self) -> String {
        self.clone()
    }
}

impl Scalar for PathBuf {
    const KIND: &'static str = "string (path)";
    const PLACEHOLDER: &'static str = "PATH";
    fn parse(s: &str) -> Result<Self, String> {
        Ok(PathBuf::from(s))
    }
    fn render(&self) -> String {
        self.display().to_string()
    }
}

/// The type of a whole setting: a scalar, an optional one, a list, or the
/// user table (file only).
pub trait SettingValue: Sized {
    fn kind() -> String;
    fn placeholder() -> &'static str;
    /// From the values a flag was given: one for a scalar, the items of a list.
    fn from_flag(values: &[String]) -> Result<Self, String>;
    fn render(&self) -> Option<String>;
}

fn single(values: &[String]) -> Result<&str, String> {
    match values {
        [one] => Ok(one),
        _ => Err(format!("takes one value, got {}", values.len())),
    }
}

macro_rules! setting_value_of_scalar {
    ($($ty:ty),*) => {$(
        impl SettingValue for $ty {
            fn kind() -> String {
                <$ty as Scalar>::KIND.to_string()
            }
            fn placeholder() -> &'static str {
                <$ty as Scalar>::PLACEHOLDER
            }
            fn from_flag(values: &[String]) -> Result<Self, String> {
                Scalar::parse(single(values)?)
            }
            fn render(&self) -> Option<String> {
                Some(Scalar::render(self))
            }
        }
    )*};
}

setting_value_of_scalar!(u16, u32, u64, usize, f64, bool, SocketAddr, String, PathBuf, LogFormat);

impl<T: Scalar> SettingValue for Option<T> {
    fn kind() -> String {
        T::KIND.to_string()
    }
    fn placeholder() -> &'static str {
        T::PLACEHOLDER
    }
    fn from_flag(values: &[String]) -> Result<Self, String> {
        T::parse(single(values)?).map(Some)
    }
    fn render(&self) -> Option<String> {
        self.as_ref().map(T::render)
    }
}

impl<T: Scalar> SettingValue for Vec<T> {
    fn kind() -> String {
        format!("list of {}", T::KIND)
    }
    fn placeholder() -> &'static str {
        T::PLACEHOLDER
    }
    /// Empty items are dropped, so `--seeds ""` means no seeds.
    fn from_flag(values: &[String]) -> Result<Self, String> {
        values.iter().filter(|v| !v.trim().is_empty()).map(|v| T::parse(v)).collect()
    }
    fn render(&self) -> Option<String> {
        (!self.is_empty()).then(|| self.iter().map(T::render).collect::<Vec<_>>().join(","))
    }
}

impl SettingValue for BTreeMap<String, String> {
    fn kind() -> String {
        "table (name = \"password\")".into()
    }
    fn placeholder() -> &'static str {
        "TABLE"
    }
    fn from_flag(_: &[String]) -> Result<Self, String> {
        Err("can only be set in the configuration file".into())
    }
    fn render(&self) -> Option<String> {
        (!self.is_empty()).then(|| format!("{} entries", self.len()))
    }
}

/// How the node writes its log lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

impl Scalar for LogFormat {
    const KIND: &'static str = "string (text or json)";
    const PLACEHOLDER: &'static str = "text|json";
    fn parse(s: &str) -> Result<Self, String> {
        match s.trim() {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            _ => Err(format!("{s:?} is not text or json")),
        }
    }
    fn render(&self) -> String {
        match self {
            LogFormat::Text => "text".into(),
            LogFormat::Json => "json".into(),
        }
    }
}

/// Stands in for a secret in `Debug` output.
pub struct Redacted;

impl fmt::Debug for Redacted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Declares the node's settings; see the module doc. Each entry:
///
/// ```text
/// /// Doc (required).
/// key: Type = default, Flag::..., [secret];
/// ```
macro_rules! declare_settings {
    (@secret) => { false };
    (@secret secret) => { true };
    ($(
        $(#[doc = $doc:literal])+
        $key:ident : $ty:ty = $default:expr, $flag:expr $(, $secret:ident)?;
    )*) => {
        /// Every setting of a node. Built by [`declare_settings!`] from the
        /// one list in this module: the TOML keys are the field names.
        #[derive(Clone, serde::Serialize, serde::Deserialize, PartialEq)]
        #[serde(default, deny_unknown_fields)]
        pub struct NodeConfig {
            $( $(#[doc = $doc])+ pub $key: $ty, )*
        }

        impl Default for NodeConfig {
            fn default() -> Self {
                NodeConfig { $( $key: $default, )* }
            }
        }

        impl std::fmt::Debug for NodeConfig {
            /// Secrets show as `<redacted>` once set, so a logged config
            /// never leaks them.
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                let defaults = NodeConfig::default();
                let mut s = f.debug_struct("NodeConfig");
                $(
                    if declare_settings!(@secret $($secret)?) && self.$key != defaults.$key {
                        s.field(stringify!($key), &$crate::config::setting::Redacted);
                    } else {
                        s.field(stringify!($key), &self.$key);
                    }
                )*
                s.finish()
            }
        }

        impl NodeConfig {
            /// Every setting, in declaration order, with its default.
            pub fn settings() -> Vec<$crate::config::setting::Setting> {
                let defaults = NodeConfig::default();
                vec![$(
                    $crate::config::setting::Setting::of::<$ty>(
                        stringify!($key),
                        concat!($($doc, "\n"),+),
                        &defaults.$key,
                        $flag,
                        declare_settings!(@secret $($secret)?),
                    ),
                )*]
            }

            /// Sets `key` from the values its flag was given; the error
            /// names the setting.
            pub fn set_from_flag(&mut self, key: &str, values: &[String]) -> Result<(), String> {
                use $crate::config::setting::SettingValue;
                match key {
                    $( stringify!($key) => {
                        self.$key = <$ty as SettingValue>::from_flag(values)
                            .map_err(|e| format!("{key}: {e}"))?;
                    } )*
                    _ => return Err(format!("no setting named {key:?}")),
                }
                Ok(())
            }
        }
    };
}

pub(crate) use declare_settings;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flag_values_parse_or_say_what_was_expected() {
        assert_eq!(<u32 as SettingValue>::from_flag(&["7".into()]), Ok(7));
        assert_eq!(
            <u32 as SettingValue>::from_flag(&["x".into()]).unwrap_err(),
            "\"x\" is not a whole number up to 4294967295"
        );
        let seeds = <Vec<SocketAddr> as SettingValue>::from_flag(&["127.0.0.1:1".into(), "".into()]).unwrap();
        assert_eq!(seeds, vec!["127.0.0.1:1".parse::<SocketAddr>().unwrap()]);
        assert_eq!(
            <Option<SocketAddr> as SettingValue>::from_flag(&["nowhere".into()]).unwrap_err(),
            "\"nowhere\" is not an IP:PORT address"
        );
        assert_eq!(<LogFormat as SettingValue>::from_flag(&["json".into()]), Ok(LogFormat::Json));
        assert!(<LogFormat as SettingValue>::from_flag(&["xml".into()]).is_err());
        assert!(<BTreeMap<String, String> as SettingValue>::from_flag(&["a".into()]).is_err());
    }

    #[test]
    fn defaults_render_as_a_flag_would_spell_them() {
        assert_eq!(SettingValue::render(&0.5f64).as_deref(), Some("0.5"));
        assert_eq!(SettingValue::render(&None::<usize>), None);
        assert_eq!(SettingValue::render(&Vec::<String>::new()), None);
        assert_eq!(SettingValue::render(&vec!["a".to_string(), "b".to_string()]).as_deref(), Some("a,b"));
        assert_eq!(SettingValue::render(&LogFormat::Text).as_deref(), Some("text"));
    }
}
