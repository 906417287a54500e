//! `rmem server`: lend this host's memory.

use std::path::PathBuf;

use clap::{Args, ValueEnum};
use rmem_memserver::{ByteSize, Server, ServerConfig};
use rmem_transport::{HugePages, Provider};

use crate::exit::{Code, Failed};

#[derive(Args, Debug)]
pub struct ServerArgs {
    /// TOML configuration file (see docs/memserver.md); flags override it.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Control address clients connect to [default: 0.0.0.0:7470].
    #[arg(long)]
    listen: Option<std::net::SocketAddr>,
    /// Memory to lend (e.g. 8G) [default: 1G].
    #[arg(long)]
    size: Option<ByteSize>,
    /// Unit of lending [default: 16M].
    #[arg(long)]
    slab_size: Option<ByteSize>,
    /// Seconds a client keeps its slabs without renewing [default: 30].
    #[arg(long)]
    lease_secs: Option<u64>,
    /// File with the shared secret clients authenticate with (else RMEM_SECRET).
    #[arg(long)]
    secret_file: Option<PathBuf>,
    /// Transport provider [default: tcp].
    #[arg(long)]
    provider: Option<Provider>,
    /// verbs: device name.
    #[arg(long)]
    device: Option<String>,
    /// Back the pool with 2 MiB huge pages [default: try].
    #[arg(long, value_enum)]
    hugepages: Option<Huge>,
    /// Serve an NBD export NAME of SIZE bytes from the pool (repeatable), e.g. swap0=4G.
    #[arg(long = "export", value_parser = parse_export)]
    exports: Vec<rmem_memserver::ExportConfig>,
    /// Address of the NBD export [default: 127.0.0.1:10809; NBD has no authentication].
    #[arg(long)]
    nbd_listen: Option<std::net::SocketAddr>,
    /// Address of the HTTP admin endpoint (/metrics, /status) [default: 127.0.0.1:7471].
    #[arg(long)]
    admin_listen: Option<std::net::SocketAddr>,
    /// No admin endpoint.
    #[arg(long, conflicts_with = "admin_listen")]
    no_admin: bool,
    /// Print the start-up line as JSON.
    #[arg(long)]
    json: bool,
}

fn parse_export(s: &str) -> Result<rmem_memserver::ExportConfig, String> {
    let (name, size) = s
        .split_once('=')
        .ok_or("expected NAME=SIZE, e.g. swap0=4G")?;
    Ok(rmem_memserver::ExportConfig {
        name: name.to_string(),
        size: size.parse()?,
    })
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Huge {
    Never,
    Try,
    Require,
}

impl ServerArgs {
    fn config(&self) -> Result<ServerConfig, Failed> {
        let mut c = match &self.config {
            Some(p) => ServerConfig::from_file(p).map_err(|e| Failed::new(Code::Usage, e))?,
            None => ServerConfig::default(),
        };
        if let Some(v) = self.listen {
            c.listen = v;
        }
        if let Some(v) = self.size {
            c.size = v;
        }
        if let Some(v) = self.slab_size {
            c.slab_size = v;
        }
        if let Some(v) = self.lease_secs {
            c.lease_secs = v;
        }
        if let Some(v) = &self.secret_file {
            c.secret_file = Some(v.clone());
        }
        if let Some(v) = self.provider {
            c.provider = v;
        }
        if let Some(v) = &self.device {
            c.device = Some(v.clone());
        }
        c.exports.extend(self.exports.iter().cloned());
        if self.no_admin {
            c.admin_listen = None;
        } else if let Some(v) = self.admin_listen {
            c.admin_listen = Some(v);
        } else if c.admin_listen.is_none() {
            c.admin_listen = Some("127.0.0.1:7471".parse().expect("literal address"));
        }
        if let Some(v) = self.nbd_listen {
            c.nbd_listen = v;
        }
        if let Some(h) = self.hugepages {
            c.hugepages = match h {
                Huge::Never => HugePages::Never,
                Huge::Try => HugePages::Try,
                Huge::Require => HugePages::Require,
            };
        }
        c.validate().map_err(|e| Failed::new(Code::Usage, e))?;
        Ok(c)
    }
}

pub fn run(a: ServerArgs) -> Result<(), Failed> {
    let cfg = a.config()?;
    let secret = cfg.load_secret().map_err(|e| Failed::new(Code::Usage, e))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| Failed::new(Code::Failure, e))?;
    rt.block_on(async move {
        let server = Server::bind(cfg.clone(), secret)
            .await
            .map_err(|e| match e {
                rmem_memserver::ServerError::Transport(t) => Failed::from(t),
                other => Failed::new(Code::Failure, other),
            })?;
        let st = server.stats();
        if a.json {
            println!(
                "{}",
                serde_json::json!({
                    "listening": server.local_addr().to_string(),
                    "provider": cfg.provider,
                    "slab_size": st.slab_size,
                    "slabs": st.slabs_total,
                    "nbd": server.nbd_addr().map(|a| a.to_string()),
                    "admin": server.admin_addr().map(|a| a.to_string()),
                })
            );
        } else {
            println!(
                "rmem server lending {} slabs of {} MiB on {} ({} provider)",
                st.slabs_total,
                st.slab_size >> 20,
                server.local_addr(),
                cfg.provider
            );
            if let Some(a) = server.admin_addr() {
                println!("metrics on http://{a}/metrics, status on http://{a}/status");
            }
            if let Some(a) = server.nbd_addr() {
                let names: Vec<_> = cfg.exports.iter().map(|e| e.name.as_str()).collect();
                println!("NBD exports {} on {a}", names.join(", "));
            }
        }
        server.run(shutdown_signal()).await;
        Ok(())
    })
}

/// SIGINT or SIGTERM: stop taking clients, end every session (slabs zeroed), exit 0.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) {
        (Ok(mut i), Ok(mut t)) => {
            tokio::select! {
                _ = i.recv() => {}
                _ = t.recv() => {}
            }
        }
        _ => std::future::pending::<()>().await,
    }
    tracing::info!("shutting down");
}
