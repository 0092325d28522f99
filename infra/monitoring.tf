# Paging on day one: a log-based metric counts the alerts the functions publish, two Cloud
# Monitoring policies (ERROR and CRITICAL alerts; WARNING alerts) notify the channels below, and
# an optional push subscription delivers every alert to an HTTPS endpoint with OIDC.
#
# The metric reads the function log line `alert published` (dicomflow/alerts.py). Its JSON fields
# kind and severity are the alert's; Cloud Run turns the line's severity into the log entry's.

locals {
  function_services = [for fn in keys(local.functions) : "\"${var.name_prefix}-${fn}\""]
  runbook           = coalesce(var.runbook_url, "docs/alerts.md")
  alert_metric_type = var.monitoring_alerts ? "logging.googleapis.com/user/${google_logging_metric.alerts[0].name}" : ""

  # One policy per severity group; each notification names the kind and links its runbook section.
  alert_policies = {
    error = {
      title    = "ERROR"
      severity = "ERROR"
      filter   = "metric.label.severity = one_of(\"ERROR\", \"CRITICAL\")"
    }
    warning = {
      title    = "WARNING"
      severity = "WARNING"
      filter   = "metric.label.severity = \"WARNING\""
    }
  }

  notification_channels = concat(
    [for c in google_monitoring_notification_channel.email : c.id],
    [for c in google_monitoring_notification_channel.webhook : c.id],
  )
}

resource "google_logging_metric" "alerts" {
  count       = var.monitoring_alerts ? 1 : 0
  name        = "${var.name_prefix}/alerts_published"
  description = "dicomflow alerts published to the alerts topic, by kind and severity."
  filter = join(" AND ", [
    "resource.type=\"cloud_run_revision\"",
    "resource.labels.service_name=(${join(" OR ", local.function_services)})",
    "jsonPayload.message=\"alert published\"",
  ])

  metric_descriptor {
    metric_kind  = "DELTA"
    value_type   = "INT64"
    unit         = "1"
    display_name = "dicomflow alerts published"

    labels {
      key         = "kind"
      value_type  = "STRING"
      description = "Alert kind (docs/alerts.md has one section per kind)."
    }
    labels {
      key         = "severity"
      value_type  = "STRING"
      description = "Alert severity: WARNING, ERROR or CRITICAL."
    }
  }

  label_extractors = {
    kind     = "EXTRACT(jsonPayload.kind)"
    severity = "EXTRACT(severity)"
  }
}

resource "google_monitoring_notification_channel" "email" {
  for_each     = toset(var.alert_emails)
  display_name = "dicomflow alerts: ${each.value}"
  type         = "email"
  labels = {
    email_address = each.value
  }
}

resource "google_monitoring_notification_channel" "webhook" {
  count        = nonsensitive(var.alert_webhook_url != null) ? 1 : 0
  display_name = "dicomflow alerts: webhook"
  type         = "webhook_tokenauth"
  labels = {
    url = var.alert_webhook_url
  }
}

resource "google_monitoring_alert_policy" "alerts" {
  for_each              = var.monitoring_alerts ? local.alert_policies : {}
  display_name          = "dicomflow ${each.value.title} alerts (${var.name_prefix})"
  combiner              = "OR"
  severity              = each.value.severity
  notification_channels = local.notification_channels
  user_labels           = local.labels

  conditions {
    display_name = "A ${each.value.title} alert was published"
    condition_threshold {
      filter          = "resource.type = \"cloud_run_revision\" AND metric.type = \"${local.alert_metric_type}\" AND ${each.value.filter}"
      comparison      = "COMPARISON_GT"
      threshold_value = 0
      duration        = "0s"

      aggregations {
        alignment_period     = "60s"
        per_series_aligner   = "ALIGN_DELTA"
        cross_series_reducer = "REDUCE_SUM"
        group_by_fields      = ["metric.label.kind", "metric.label.severity"]
      }

      trigger {
        count = 1
      }
    }
  }

  alert_strategy {
    auto_close = "1800s"
  }

  # $${...} is a Cloud Monitoring template variable, filled in per incident.
  documentation {
    mime_type = "text/markdown"
    subject   = "dicomflow $${metric.label.severity}: $${metric.label.kind}"
    content   = <<-EOT
      dicomflow published a **$${metric.label.kind}** alert ($${metric.label.severity}).

      Runbook: ${local.runbook}#$${metric.label.kind}

      The alert itself (subject, counts, sample labels; never PHI) is on the alerts topic
      `${google_pubsub_topic.alerts.id}` and, until read, in the subscription
      `${google_pubsub_subscription.alerts_inbox.id}`.
    EOT
  }
}

# --- Optional push delivery to the user's HTTPS endpoint ---

resource "google_service_account" "alert_push" {
  count        = var.alert_push_endpoint == null ? 0 : 1
  account_id   = "${var.name_prefix}-alerts"
  display_name = "dicomflow alert push"
  description  = "Identity in the OIDC token of each alert pushed to alert_push_endpoint; holds no role."
}

# Pub/Sub mints the OIDC tokens as the Pub/Sub service agent acting as the push identity.
resource "google_service_account_iam_member" "alert_push_token_creator" {
  count              = var.alert_push_endpoint == null ? 0 : 1
  service_account_id = google_service_account.alert_push[0].name
  role               = "roles/iam.serviceAccountTokenCreator"
  member             = local.pubsub_agent
}

# A failed push is retried with backoff from 10 s to 10 min; after 10 attempts the alert goes to
# the dead-letter topic (and its subscription keeps it 7 days) instead of looping.
resource "google_pubsub_subscription" "alerts_push" {
  count                      = var.alert_push_endpoint == null ? 0 : 1
  name                       = "${var.name_prefix}-alerts-push"
  topic                      = google_pubsub_topic.alerts.id
  labels                     = local.labels
  ack_deadline_seconds       = 60
  message_retention_duration = "604800s"

  push_config {
    push_endpoint = var.alert_push_endpoint
    oidc_token {
      service_account_email = google_service_account.alert_push[0].email
      audience              = coalesce(var.alert_push_audience, var.alert_push_endpoint)
    }
  }

  retry_policy {
    minimum_backoff = "10s"
    maximum_backoff = "600s"
  }

  dead_letter_policy {
    dead_letter_topic     = google_pubsub_topic.alerts_dead_letter.id
    max_delivery_attempts = 10
  }

  expiration_policy {
    ttl = ""
  }
}

resource "google_pubsub_subscription_iam_member" "push_dead_letter_subscriber" {
  count        = var.alert_push_endpoint == null ? 0 : 1
  subscription = google_pubsub_subscription.alerts_push[0].id
  role         = "roles/pubsub.subscriber"
  member       = local.pubsub_agent
}
