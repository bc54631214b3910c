//! The MCP endpoint's limits and the hosts and origins it answers.

/// MCP settings (the `mcp_*` keys, HEIST_MCP_* variables; see docs/OPERATIONS.md).
#[derive(Clone, Debug)]
pub struct McpConfig {
    /// `Host` values `/mcp` answers (DNS-rebinding protection); `host` or `host:port`, `*` for
    /// any. HEIST_MCP_ALLOWED_HOSTS, default `localhost,127.0.0.1,::1,coordinator` (the compose
    /// service name).
    pub allowed_hosts: Vec<String>,
    /// Browser origins allowed to call `/mcp` (`scheme://host:port`, `:*` for any port). A
    /// request carrying another `Origin` is refused with 403; requests without one (non-browser
    /// clients) pass. HEIST_MCP_ALLOWED_ORIGINS, default none.
    pub allowed_origins: Vec<String>,
    /// Largest JSON-RPC request body, in bytes (413 above it). HEIST_MCP_MAX_REQUEST_BYTES,
    /// default 4 MiB.
    pub max_request_bytes: usize,
    /// Largest tool result, in bytes of JSON; a larger one becomes an `isError` result saying
    /// so. HEIST_MCP_MAX_RESULT_BYTES, default 4 MiB.
    pub max_result_bytes: usize,
    /// The coordinator's public base URL (`https://heist.example.com`), named in the OAuth
    /// documents and the `WWW-Authenticate` challenge. HEIST_PUBLIC_URL, default
    /// `http://` + the request's `Host`.
    pub public_url: Option<String>,
}

impl Default for McpConfig {
    fn default() -> Self {
        Self {
            allowed_hosts: ["localhost", "127.0.0.1", "::1", "coordinator"]
                .map(str::to_owned)
                .to_vec(),
            allowed_origins: Vec::new(),
            max_request_bytes: 4 << 20,
            max_result_bytes: 4 << 20,
            public_url: None,
        }
    }
}

impl McpConfig {
    /// Checks the limits; the error names the variable to fix.
    pub fn validate(&self) -> Result<(), String> {
        if self.max_request_bytes < 1024 {
            return Err("HEIST_MCP_MAX_REQUEST_BYTES must be at least 1024".to_owned());
        }
        if self.max_result_bytes < 1024 {
            return Err("HEIST_MCP_MAX_RESULT_BYTES must be at least 1024".to_owned());
        }
        if let Some(url) = &self.public_url
            && !(url.starts_with("http://") || url.starts_with("https://"))
        {
            return Err("HEIST_PUBLIC_URL must start with http:// or https://".to_owned());
        }
        Ok(())
    }

    /// The base URL for a request: [`Self::public_url`], else `http://` + its `Host` (HTTP/1.1)
    /// or authority (HTTP/2).
    pub fn base_url(&self, uri: &http::Uri, headers: &http::HeaderMap) -> String {
        if let Some(url) = &self.public_url {
            return url.trim_end_matches('/').to_owned();
        }
        let host = headers
            .get(http::header::HOST)
            .and_then(|h| h.to_str().ok())
            .or_else(|| uri.authority().map(|a| a.as_str()))
            .unwrap_or("localhost");
        format!("http://{host}")
    }
}
