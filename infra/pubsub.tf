# Topics, the alerts inbox, the optional push subscription, and the Cloud Scheduler jobs that drive
# the ticks. Topics use var.kms_key_name when it is set (CMEK), Google-managed encryption otherwise.

resource "google_pubsub_topic" "tick" {
  name         = "${var.name_prefix}-tick"
  labels       = local.labels
  kms_key_name = var.kms_key_name
  depends_on   = [google_kms_crypto_key_iam_member.agents]
}

resource "google_pubsub_topic" "export_schedule" {
  name         = "${var.name_prefix}-export-schedule"
  labels       = local.labels
  kms_key_name = var.kms_key_name
  depends_on   = [google_kms_crypto_key_iam_member.agents]
}

# Alerts carry UIDs, counts and hashed object names, never PHI.
resource "google_pubsub_topic" "alerts" {
  name                       = "${var.name_prefix}-alerts"
  labels                     = local.labels
  message_retention_duration = "604800s"
  kms_key_name               = var.kms_key_name
  depends_on                 = [google_kms_crypto_key_iam_member.agents]
}

resource "google_pubsub_topic" "alerts_dead_letter" {
  name                       = "${var.name_prefix}-alerts-dead-letter"
  labels                     = local.labels
  message_retention_duration = "604800s"
  kms_key_name               = var.kms_key_name
  depends_on                 = [google_kms_crypto_key_iam_member.agents]
}

# Alerts are kept here until someone reads them, so none is lost before an alerting pipeline is
# attached. An alert a consumer fails on 10 times moves to the dead-letter topic instead of
# looping; the dead-letter subscription keeps it for 7 days.
resource "google_pubsub_subscription" "alerts_inbox" {
  name                       = "${var.name_prefix}-alerts-inbox"
  topic                      = google_pubsub_topic.alerts.id
  labels                     = local.labels
  ack_deadline_seconds       = 60
  message_retention_duration = "604800s"

  expiration_policy {
    ttl = "" # never expires
  }

  dead_letter_policy {
    dead_letter_topic     = google_pubsub_topic.alerts_dead_letter.id
    max_delivery_attempts = 10
  }
}

resource "google_pubsub_subscription" "alerts_dead_letter" {
  name                       = "${var.name_prefix}-alerts-dead-letter"
  topic                      = google_pubsub_topic.alerts_dead_letter.id
  labels                     = local.labels
  message_retention_duration = "604800s"

  expiration_policy {
    ttl = ""
  }
}

# Dead-lettering is done by the Pub/Sub service agent: it must publish to the dead-letter topic
# and acknowledge on the source subscription.
resource "google_pubsub_topic_iam_member" "dead_letter_publisher" {
  topic  = google_pubsub_topic.alerts_dead_letter.id
  role   = "roles/pubsub.publisher"
  member = local.pubsub_agent
}

resource "google_pubsub_subscription_iam_member" "dead_letter_subscriber" {
  subscription = google_pubsub_subscription.alerts_inbox.id
  role         = "roles/pubsub.subscriber"
  member       = local.pubsub_agent
}

resource "google_cloud_scheduler_job" "tick" {
  name        = "${var.name_prefix}-tick"
  region      = var.region
  description = "dicomflow tick: ingest seals batches and starts imports; report tracks operations."
  schedule    = var.tick_schedule
  time_zone   = var.time_zone

  pubsub_target {
    topic_name = google_pubsub_topic.tick.id
    data       = base64encode(jsonencode({ tick = "minute" }))
  }
}

resource "google_cloud_scheduler_job" "export" {
  name        = "${var.name_prefix}-export"
  region      = var.region
  description = "dicomflow daily export of the DICOM store to the backups bucket."
  schedule    = var.export_schedule
  time_zone   = var.time_zone

  pubsub_target {
    topic_name = google_pubsub_topic.export_schedule.id
    data       = base64encode(jsonencode({ tick = "export" }))
  }
}
