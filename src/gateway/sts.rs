//! The gateway's one call to STS: replay a proof's GetCallerIdentity to
//! the fixed regional endpoint and read who signed it.
//!
//! The request is the one [`super::proof::check`] rebuilt: the host, path
//! and scheme are the gateway's (the CVE-2020-16250 class: a client-shaped
//! request sent to another API), the `host` header is the STS host the
//! signature covers, and the gateway adds its own id in the signed header.
//! No redirects are followed (hyper's connection API follows none), the
//! answer is read up to 64 KiB and parsed strictly, and the whole call is
//! bounded in time.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use thiserror::Error;
use tokio::net::TcpStream;

use super::proof::{GATEWAY_ID_HEADER, NONCE_HEADER, StsCall};

/// The longest STS answer read.
const MAX_ANSWER: usize = 64 * 1024;

/// Where STS is dialled.
#[derive(Clone)]
pub struct StsEndpoint {
    /// `None`: `https://` the STS host of the call, port 443. `Some`: an
    /// operator's override (`[gateway] sts_endpoint_url`, for VPC
    /// endpoints and the test bed), dialled instead; the `host` header
    /// stays the signed STS host.
    pub dial: Option<Dial>,
    /// Roots for `https` (the system's store); `None` only when the
    /// override is `http://`.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    pub timeout: Duration,
}

impl std::fmt::Debug for StsEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StsEndpoint")
            .field("dial", &self.dial)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// An overriding endpoint URL, read once at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dial {
    pub https: bool,
    pub host: String,
    pub port: u16,
}

impl Dial {
    /// `http://HOST[:PORT]` or `https://HOST[:PORT]`, no path.
    pub fn parse(url: &str) -> Result<Self, String> {
        let (https, rest) = if let Some(r) = url.strip_prefix("https://") {
            (true, r)
        } else if let Some(r) = url.strip_prefix("http://") {
            (false, r)
        } else {
            return Err(format!(
                "{url:?}: the STS endpoint URL must start with https:// (or http:// for a local test)"
            ));
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.is_empty() || rest.contains(['/', '?', '#', '@']) {
            return Err(format!(
                "{url:?}: the STS endpoint URL is a scheme, host and port only"
            ));
        }
        let (host, port) = match rest.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => match p.parse() {
                Ok(p) => (h, p),
                Err(_) => return Err(format!("{url:?}: bad port")),
            },
            _ => (rest, if https { 443 } else { 80 }),
        };
        Ok(Self {
            https,
            host: host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned(),
            port,
        })
    }
}

/// Who STS says signed the proof.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub arn: String,
    pub account: String,
    pub user_id: String,
}

#[derive(Debug, Error)]
pub enum StsError {
    /// STS answered with an error: the proof is not valid.
    #[error("STS refused the proof: {code} ({message})")]
    Refused { code: String, message: String },
    /// STS could not be asked or answered oddly: nothing is known.
    #[error("STS could not be asked: {0}")]
    Unavailable(String),
    #[error("STS did not answer within {0:?}")]
    Timeout(Duration),
}

/// Sends the call and reads the caller, within the endpoint's timeout.
pub async fn get_caller_identity(ep: &StsEndpoint, call: &StsCall) -> Result<Caller, StsError> {
    tokio::time::timeout(ep.timeout, ask(ep, call))
        .await
        .map_err(|_| StsError::Timeout(ep.timeout))?
}

async fn ask(ep: &StsEndpoint, call: &StsCall) -> Result<Caller, StsError> {
    let unavailable = |e: &dyn std::fmt::Display| StsError::Unavailable(e.to_string());
    let (https, host, port) = match &ep.dial {
        Some(d) => (d.https, d.host.as_str(), d.port),
        None => (true, call.host.as_str(), 443),
    };
    let tcp = TcpStream::connect((host, port))
        .await
        .map_err(|e| unavailable(&format_args!("connect to {host}:{port}: {e}")))?;
    let _ = tcp.set_nodelay(true);
    let request = http::Request::get(call.path_and_query.expose())
        .header(http::header::HOST, &call.host)
        .header(GATEWAY_ID_HEADER, &call.gateway_id)
        .header(NONCE_HEADER, &call.nonce)
        .header(
            http::header::USER_AGENT,
            concat!("rds-iam-proxy/", env!("CARGO_PKG_VERSION")),
        )
        .body(Empty::<Bytes>::new())
        .map_err(|e| unavailable(&e))?;
    let answer = if https {
        let name =
            rustls_pki_types::ServerName::try_from(host.to_owned()).map_err(|e| unavailable(&e))?;
        let config = ep
            .tls
            .clone()
            .ok_or_else(|| unavailable(&"no trust store for https"))?;
        let tls = tokio_rustls::TlsConnector::from(config)
            .connect(name, tcp)
            .await
            .map_err(|e| unavailable(&format_args!("TLS with {host}: {e}")))?;
        send(TokioIo::new(tls), request).await?
    } else {
        send(TokioIo::new(tcp), request).await?
    };
    let (status, body) = answer;
    let text = std::str::from_utf8(&body).map_err(|_| unavailable(&"the answer is not UTF-8"))?;
    if status.is_success() {
        parse_caller(text)
            .ok_or_else(|| unavailable(&"the answer is not a GetCallerIdentity result"))
    } else {
        match parse_error(text) {
            Some((code, message)) if status.is_client_error() => {
                Err(StsError::Refused { code, message })
            }
            Some((code, message)) => {
                Err(unavailable(&format_args!("{status}: {code} ({message})")))
            }
            None => Err(unavailable(&format_args!(
                "HTTP {status} without an STS error"
            ))),
        }
    }
}

async fn send<IO>(
    io: TokioIo<IO>,
    request: http::Request<Empty<Bytes>>,
) -> Result<(http::StatusCode, Bytes), StsError>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let unavailable = |e: &dyn std::fmt::Display| StsError::Unavailable(e.to_string());
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| unavailable(&e))?;
    // The connection runs beside the request; it ends with this call.
    let driver = tokio::spawn(conn);
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| unavailable(&e));
    let result = match response {
        Ok(r) => {
            let status = r.status();
            Limited::new(r.into_body(), MAX_ANSWER)
                .collect()
                .await
                .map(|b| (status, b.to_bytes()))
                .map_err(|e| unavailable(&format_args!("reading the answer: {e}")))
        }
        Err(e) => Err(e),
    };
    driver.abort();
    result
}

/// `GetCallerIdentityResponse/GetCallerIdentityResult/{Arn,UserId,Account}`,
/// each once and non-empty.
fn parse_caller(xml: &str) -> Option<Caller> {
    let doc = roxmltree::Document::parse(xml).ok()?;
    let root = doc.root_element();
    if root.tag_name().name() != "GetCallerIdentityResponse" {
        return None;
    }
    let mut results = root
        .children()
        .filter(|n| n.is_element() && n.tag_name().name() == "GetCallerIdentityResult");
    let result = results.next()?;
    if results.next().is_some() {
        return None;
    }
    let field = |name: &str| -> Option<String> {
        let mut found = result
            .children()
            .filter(|n| n.is_element() && n.tag_name().name() == name);
        let v = found.next()?.text()?.trim().to_owned();
        (found.next().is_none() && !v.is_empty()).then_some(v)
    };
    Some(Caller {
        arn: field("Arn")?,
        account: field("Account")?,
        user_id: field("UserId")?,
    })
}

/// `ErrorResponse/Error/{Code,Message}`.
fn parse_error(xml: &str) -> Option<(String, String)> {
    let doc = roxmltree::Document::parse(xml).ok()?;
    let error = doc
        .root_element()
        .descendants()
        .find(|n| n.is_element() && n.tag_name().name() == "Error")?;
    let text = |name: &str| {
        error
            .children()
            .find(|n| n.is_element() && n.tag_name().name() == name)
            .and_then(|n| n.text())
            .map(|t| t.chars().take(200).collect::<String>())
    };
    Some((text("Code")?, text("Message").unwrap_or_default()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_sts_answers_strictly() {
        let ok = r#"<GetCallerIdentityResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">
  <GetCallerIdentityResult>
    <Arn>arn:aws:sts::111122223333:assumed-role/AWSReservedSSO_DBA_0123456789abcdef/arianna</Arn>
    <UserId>AROAEXAMPLE:arianna</UserId>
    <Account>111122223333</Account>
  </GetCallerIdentityResult>
  <ResponseMetadata><RequestId>x</RequestId></ResponseMetadata>
</GetCallerIdentityResponse>"#;
        let c = parse_caller(ok).unwrap();
        assert_eq!(c.account, "111122223333");
        assert_eq!(c.user_id, "AROAEXAMPLE:arianna");
        // A second Arn, a missing field, another root: nothing is guessed.
        let twice = ok.replace("<Account>", "<Arn>arn:aws:iam::1:user/x</Arn><Account>");
        assert_eq!(parse_caller(&twice), None);
        assert_eq!(
            parse_caller(&ok.replace("<UserId>AROAEXAMPLE:arianna</UserId>", "")),
            None
        );
        assert_eq!(
            parse_caller(&ok.replace("GetCallerIdentityResponse", "AssumeRoleResponse")),
            None
        );
        assert_eq!(parse_caller("not xml"), None);
        let err = r#"<ErrorResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">
  <Error><Type>Sender</Type><Code>SignatureDoesNotMatch</Code><Message>no</Message></Error>
  <RequestId>x</RequestId></ErrorResponse>"#;
        assert_eq!(
            parse_error(err),
            Some(("SignatureDoesNotMatch".into(), "no".into()))
        );
    }

    /// A one-connection HTTP server for the client tests: reads the
    /// request head, then sends `answer` (or nothing, when `None`); the
    /// head it read comes back through the join handle.
    async fn serve_once(answer: Option<String>) -> (Dial, tokio::task::JoinHandle<String>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let task = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = s.read(&mut buf).await.unwrap();
                if n == 0 {
                    break;
                }
                head.extend_from_slice(&buf[..n]);
            }
            match answer {
                Some(a) => s.write_all(a.as_bytes()).await.unwrap(),
                None => tokio::time::sleep(Duration::from_secs(30)).await,
            }
            String::from_utf8_lossy(&head).into_owned()
        });
        let dial = Dial {
            https: false,
            host: "127.0.0.1".into(),
            port,
        };
        (dial, task)
    }

    fn call() -> StsCall {
        StsCall {
            host: "sts.eu-west-1.amazonaws.com".into(),
            path_and_query: crate::secret::Secret::new("/?Action=GetCallerIdentity&X=1".into()),
            gateway_id: "bastion".into(),
            nonce: "0123456789abcdef0123456789abcdef".into(),
        }
    }

    fn endpoint(dial: Dial, timeout: Duration) -> StsEndpoint {
        StsEndpoint {
            dial: Some(dial),
            tls: None,
            timeout,
        }
    }

    /// The request names the signed STS host and carries both signed
    /// headers; answers are read for what they are: a caller, STS's
    /// refusal, a server error or a redirect (never followed), silence.
    #[tokio::test]
    async fn asks_sts_and_reads_each_kind_of_answer() {
        let http = |status: &str, extra: &str, body: &str| {
            format!(
                "HTTP/1.1 {status}\r\n{extra}Content-Length: {}\r\n\r\n{body}",
                body.len()
            )
        };
        let ok = http(
            "200 OK",
            "",
            "<GetCallerIdentityResponse><GetCallerIdentityResult><Arn>arn:aws:sts::111122223333:assumed-role/AWSReservedSSO_D_0123456789abcdef/ari</Arn><UserId>AROAX:ari</UserId><Account>111122223333</Account></GetCallerIdentityResult></GetCallerIdentityResponse>",
        );
        let (dial, head) = serve_once(Some(ok)).await;
        let caller = get_caller_identity(&endpoint(dial, Duration::from_secs(5)), &call())
            .await
            .unwrap();
        assert_eq!(caller.user_id, "AROAX:ari");
        let head = head.await.unwrap().to_ascii_lowercase();
        assert!(
            head.starts_with("get /?action=getcalleridentity&x=1 http/1.1\r\n"),
            "{head}"
        );
        assert!(
            head.contains("host: sts.eu-west-1.amazonaws.com\r\n"),
            "{head}"
        );
        assert!(
            head.contains("x-rds-iam-proxy-gateway-id: bastion\r\n"),
            "{head}"
        );
        assert!(
            head.contains("x-rds-iam-proxy-nonce: 0123456789abcdef0123456789abcdef\r\n"),
            "{head}"
        );

        let refused = http(
            "403 Forbidden",
            "",
            "<ErrorResponse><Error><Code>SignatureDoesNotMatch</Code><Message>no</Message></Error><RequestId>r</RequestId></ErrorResponse>",
        );
        let (dial, _) = serve_once(Some(refused)).await;
        let e = get_caller_identity(&endpoint(dial, Duration::from_secs(5)), &call()).await;
        assert!(
            matches!(e, Err(StsError::Refused { ref code, .. }) if code == "SignatureDoesNotMatch"),
            "{e:?}"
        );

        for answer in [
            http("500 Internal Server Error", "", ""),
            http("302 Found", "Location: http://evil.example/\r\n", ""),
            http("200 OK", "", "not xml!!"),
        ] {
            let (dial, _) = serve_once(Some(answer.clone())).await;
            let e = get_caller_identity(&endpoint(dial, Duration::from_secs(5)), &call()).await;
            assert!(
                matches!(e, Err(StsError::Unavailable(_))),
                "{answer}: {e:?}"
            );
        }

        let (dial, _) = serve_once(None).await;
        let e = get_caller_identity(&endpoint(dial, Duration::from_millis(200)), &call()).await;
        assert!(matches!(e, Err(StsError::Timeout(_))), "{e:?}");
    }

    #[test]
    fn endpoint_urls() {
        assert_eq!(
            Dial::parse("http://127.0.0.1:4566").unwrap(),
            Dial {
                https: false,
                host: "127.0.0.1".into(),
                port: 4566
            }
        );
        assert_eq!(
            Dial::parse("https://sts.vpce.example/").unwrap(),
            Dial {
                https: true,
                host: "sts.vpce.example".into(),
                port: 443
            }
        );
        assert_eq!(Dial::parse("https://[::1]:8443").unwrap().host, "::1");
        for bad in [
            "sts.amazonaws.com",
            "ftp://x",
            "https://x/path",
            "https://u@x",
            "https://x:port",
        ] {
            assert!(Dial::parse(bad).is_err(), "{bad}");
        }
    }
}
