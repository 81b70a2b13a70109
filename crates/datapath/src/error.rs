use std::io;
use std::path::PathBuf;

use aya::maps::MapError;
use aya::pin::PinError;
use aya::programs::links::LinkError;
use aya::programs::ProgramError;
use aya::EbpfError;

use crate::table::Direction;

/// Errors of the datapath. aya's errors are boxed to keep `Result` small.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    NotBuilt(#[from] palisade_bpf::NotBuilt),
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("{} is not on a bpf filesystem (mount -t bpf bpf /sys/fs/bpf)", path.display())]
    NotBpffs { path: PathBuf },
    #[error("loading the {object} object: {source}")]
    Load {
        object: &'static str,
        source: Box<EbpfError>,
    },
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        source: Box<ProgramError>,
    },
    #[error("the {object} object has no program {name}")]
    MissingProgram {
        object: &'static str,
        name: &'static str,
    },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        source: Box<MapError>,
    },
    #[error("the object has no map {0}")]
    MissingMap(&'static str),
    #[error("program {program} uses map id {map_id}, which is not one of the maps pinned in {}", pin_dir.display())]
    MapsNotShared {
        program: &'static str,
        map_id: u32,
        pin_dir: PathBuf,
    },
    #[error(
        "pinned map {name} has (key, value) sizes {found:?}, this build expects {expected:?}: it was pinned by an incompatible version (remove the pin directory to start afresh)"
    )]
    IncompatiblePinnedMap {
        name: &'static str,
        found: (usize, usize),
        expected: (usize, usize),
    },
    #[error("link {}: {source}", path.display())]
    Link {
        path: PathBuf,
        source: Box<LinkError>,
    },
    #[error("pinning {}: {source}", path.display())]
    Pin {
        path: PathBuf,
        source: Box<PinError>,
    },
    #[error("interface {name:?}: {source}")]
    Interface { name: String, source: io::Error },
    #[error("invalid interface name {0:?}")]
    InvalidInterfaceName(String),
    #[error(
        "writing the {direction:?} table of endpoint {endpoint_id} ({entries} LPM entries) failed, the endpoint now fails closed: {source}"
    )]
    Table {
        endpoint_id: u32,
        direction: Direction,
        entries: usize,
        source: Box<MapError>,
    },
    #[error("BPF_PROG_TEST_RUN of {name}: {source}")]
    TestRun {
        name: &'static str,
        source: Box<ProgramError>,
    },
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(io::Error) -> Error {
        let path = path.into();
        move |source| Error::Io { path, source }
    }

    pub(crate) fn map(name: &'static str) -> impl FnOnce(MapError) -> Error {
        move |source| Error::Map {
            name,
            source: Box::new(source),
        }
    }
}
