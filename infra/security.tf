# The deployment key, customer-managed encryption and Data Access audit logs.

# --- The deployment key (HMAC of alert labels, alert UIDs and erasure tombstones) ---
#
# Terraform creates the secret, never its value: a value made here would be stored in clear in the
# Terraform state. The operator adds the first version once (README "Deployment key"); the functions
# read versions/latest through DICOMFLOW_KEY_SECRET. Only the three function service accounts may
# read it, on this one secret.
resource "google_secret_manager_secret" "deployment_key" {
  secret_id = "${var.name_prefix}-deployment-key"
  labels    = local.labels

  replication {
    auto {
      dynamic "customer_managed_encryption" {
        for_each = local.kms_keys
        content {
          kms_key_name = customer_managed_encryption.value
        }
      }
    }
  }

  depends_on = [google_kms_crypto_key_iam_member.agents]
}

resource "google_secret_manager_secret_iam_member" "deployment_key" {
  for_each  = local.functions
  secret_id = google_secret_manager_secret.deployment_key.id
  role      = "roles/secretmanager.secretAccessor"
  member    = google_service_account.fn[each.key].member
}

# --- CMEK: the service agents that encrypt for dicomflow may use the key, and nothing else may ---

locals {
  # Cloud Storage (buckets), Pub/Sub (topics), Healthcare (dataset) and Secret Manager (the key).
  kms_agents = var.kms_key_name == null ? {} : {
    storage       = data.google_storage_project_service_account.this.member
    pubsub        = local.pubsub_agent
    healthcare    = local.healthcare_agent
    secretmanager = "serviceAccount:service-${data.google_project.this.number}@gcp-sa-secretmanager.iam.gserviceaccount.com"
  }
}

resource "google_kms_crypto_key_iam_member" "agents" {
  for_each      = local.kms_agents
  crypto_key_id = var.kms_key_name
  role          = "roles/cloudkms.cryptoKeyEncrypterDecrypter"
  member        = each.value
}

# --- Data Access audit logs: who read or changed which object or DICOM instance ---
#
# Admin Activity logs are always on. Data Access logs are off by default on Google Cloud; these
# turn them on for the two services that hold PHI here. They are the access log of the buckets
# (see the CKV_GCP_62 skips in storage.tf). Audit log entries name objects and DICOM UIDs: they are
# Google's records, outside dicomflow's own no-UID logging rule; restrict who may read them.
resource "google_project_iam_audit_config" "data_access" {
  for_each = var.data_access_audit_logs ? toset(["healthcare.googleapis.com", "storage.googleapis.com"]) : toset([])
  project  = var.project_id
  service  = each.value

  audit_log_config {
    log_type = "ADMIN_READ"
  }
  audit_log_config {
    log_type = "DATA_READ"
  }
  audit_log_config {
    log_type = "DATA_WRITE"
  }
}
