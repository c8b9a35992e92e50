//! cinder's API crate: the Firecracker-compatible JSON API over a Unix
//! socket and the `--config-file` schema, with no KVM inside.
//!
//! - [`model`]: request/response bodies (serde), as in Firecracker's
//!   OpenAPI document;
//! - [`config`]: [`VmConfig`], the one internal configuration, and its
//!   validation; [`VmConfig::from_config_file`];
//! - [`paths`]: the host files a client names (kernel, initrd, drive images): opened
//!   without blocking, `fstat`-checked, regular files only ([`paths::PathPolicy`]);
//! - [`http`]: HTTP/1.1 framing;
//! - [`routes`]: the route table and the router to [`ApiRequest`];
//! - [`server`]: [`ApiServer`], one thread, many clients;
//! - [`handler`]: the [`RequestHandler`] seam and [`ChannelHandler`], which
//!   hands requests to the VMM event loop;
//! - [`controller`]: [`PreBootController`], the configuration state machine;
//! - [`adapter`]: what the VMM is asked to do ([`VmmAction`]), why it fails
//!   ([`VmmError`]), and how its result becomes an answer.

#![deny(missing_docs)]

pub mod adapter;
pub mod config;
pub mod controller;
pub mod handler;
pub mod http;
pub mod model;
pub mod paths;
pub mod routes;
pub mod server;

pub use adapter::{action_response, VmmAction, VmmError};
pub use config::{ConfigError, VmConfig};
pub use controller::{Outcome, PreBootController};
pub use handler::{api_channel, ChannelHandler, RequestHandler, VmmEndpoint};
pub use routes::{parse_api_request, route_table, ApiRequest, ApiResponse, RequestError, Route};
pub use server::{ApiError, ApiServer, ServerConfig, ShutdownHandle};
