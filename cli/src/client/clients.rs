//! ClientService calls (admin scope). None is retried after a transport failure: a retried
//! create or rotate could hand out a secret nobody sees.

use heist_proto::v1::{self, client_service_client::ClientServiceClient};

use super::Client;
use crate::error::Error;

impl Client {
    fn clients(&self) -> ClientServiceClient<tonic::transport::Channel> {
        ClientServiceClient::new(self.channel.clone())
    }

    /// Registers a client; the response carries its secret, shown only once.
    pub async fn create_client(
        &self,
        client_id: &str,
        scopes: Vec<String>,
    ) -> Result<v1::CreateClientResponse, Error> {
        let request = self.authed(v1::CreateClientRequest {
            client_id: client_id.to_owned(),
            scopes,
        })?;
        Ok(self.clients().create_client(request).await?.into_inner())
    }

    /// Every client, without secrets.
    pub async fn list_clients(&self) -> Result<Vec<v1::ApiClient>, Error> {
        let request = self.authed(v1::ListClientsRequest {})?;
        Ok(self
            .clients()
            .list_clients(request)
            .await?
            .into_inner()
            .clients)
    }

    /// A new secret for a client (shown only once); its old secret and tokens stop working.
    pub async fn rotate_client_secret(
        &self,
        client_id: &str,
    ) -> Result<v1::RotateClientSecretResponse, Error> {
        let request = self.authed(v1::RotateClientSecretRequest {
            client_id: client_id.to_owned(),
        })?;
        Ok(self
            .clients()
            .rotate_client_secret(request)
            .await?
            .into_inner())
    }

    /// Makes a fresh key the coordinator's token signing key (the old one stays accepted until
    /// its tokens expire).
    pub async fn rotate_signing_key(&self) -> Result<v1::RotateSigningKeyResponse, Error> {
        let request = self.authed(v1::RotateSigningKeyRequest {})?;
        Ok(self
            .clients()
            .rotate_signing_key(request)
            .await?
            .into_inner())
    }

    /// Revokes a client for good.
    pub async fn revoke_client(&self, client_id: &str) -> Result<v1::RevokeClientResponse, Error> {
        let request = self.authed(v1::RevokeClientRequest {
            client_id: client_id.to_owned(),
        })?;
        Ok(self.clients().revoke_client(request).await?.into_inner())
    }
}
