output "landing_bucket" {
  description = "Upload DICOM files here: gs://LANDING/any/path/file.dcm."
  value       = google_storage_bucket.landing.name
}

output "staging_bucket" {
  description = "The pipeline's batches, quarantine, manifests and state."
  value       = google_storage_bucket.staging.name
}

output "backups_bucket" {
  description = "Daily exports land under gs://BACKUPS/PREFIX/DATE/."
  value       = google_storage_bucket.backups.name
}

output "dicom_store" {
  description = "The DICOM store the pipeline imports into and exports from."
  value       = local.dicom_store_name
}

output "alerts_topic" {
  description = "Topic the alerts are published to; attach alerting pipelines here."
  value       = google_pubsub_topic.alerts.id
}

output "alerts_subscription" {
  description = "Pull subscription that keeps every alert for 7 days: gcloud pubsub subscriptions pull SUB --auto-ack."
  value       = google_pubsub_subscription.alerts_inbox.id
}

output "functions" {
  description = "Function name, service account and Cloud Run URI of each function."
  value = {
    for name, fn in google_cloudfunctions2_function.fn : name => {
      name            = fn.name
      service_account = google_service_account.fn[name].email
      uri             = fn.service_config[0].uri
    }
  }
}

output "source_object" {
  description = "The deployed source archive, named by its SHA-256."
  value       = "gs://${google_storage_bucket.source.name}/${google_storage_bucket_object.source.name}"
}

output "deployment_key_secret" {
  description = "Secret Manager secret of the deployment key. Add its first version before the first upload (README \"Deployment key\")."
  value       = google_secret_manager_secret.deployment_key.id
}

output "alert_policies" {
  description = "Cloud Monitoring alert policies (ERROR, WARNING), when monitoring_alerts is on."
  value       = { for k, p in google_monitoring_alert_policy.alerts : k => p.name }
}

output "alerts_push_subscription" {
  description = "The push subscription to alert_push_endpoint, or null."
  value       = one(google_pubsub_subscription.alerts_push[*].id)
}

output "drill_store" {
  description = "The restore drill's scratch DICOM store, or null when restore_drill_days is 0."
  value       = local.drill_on ? local.drill_store_name : null
}

output "alerts_push_service_account" {
  description = "Identity in the OIDC token of pushed alerts, or null. Grant it roles/run.invoker on the receiving function or Cloud Run service."
  value       = one(google_service_account.alert_push[*].email)
}
