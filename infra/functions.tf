# The three Gen2 functions, built from one source archive named by its hash, so that a code change
# redeploys. The archive holds main.py, requirements.txt and the modules of dicomflow/ that the
# functions run: an allow-list, so tests/, localcloud/, bench/, infra/ and anything else in the
# repository never ship, and neither do the operator tools of dicomflow/ops/ nor the CLI entry
# dicomflow/__main__.py (modules/source_files computes the list; tests/unit/test_archive.py runs it).

locals {
  repo_root    = "${path.module}/.."
  package_root = "${path.module}/../dicomflow"
}

module "source_files" {
  source = "./modules/source_files"
  root   = local.repo_root
}

data "archive_file" "source" {
  type        = "zip"
  output_path = "${path.module}/.build/dicomflow-source.zip"

  source {
    filename = "main.py"
    content  = file("${local.repo_root}/main.py")
  }

  source {
    filename = "requirements.txt"
    content  = file("${local.repo_root}/requirements.txt")
  }

  dynamic "source" {
    for_each = module.source_files.package_files
    content {
      filename = "dicomflow/${source.value}"
      content  = file("${local.package_root}/${source.value}")
    }
  }
}

resource "google_storage_bucket_object" "source" {
  name   = "dicomflow-${data.archive_file.source.output_sha256}.zip"
  bucket = google_storage_bucket.source.name
  source = data.archive_file.source.output_path
}

resource "google_cloudfunctions2_function" "fn" {
  for_each = local.functions

  name        = "${var.name_prefix}-${each.key}"
  location    = var.region
  description = each.value.description
  labels      = local.labels

  build_config {
    runtime         = var.runtime
    entry_point     = each.key
    service_account = var.build_service_account
    source {
      storage_source {
        bucket = google_storage_bucket.source.name
        object = google_storage_bucket_object.source.name
      }
    }
  }

  service_config {
    service_account_email            = google_service_account.fn[each.key].email
    environment_variables            = local.function_env
    timeout_seconds                  = each.value.timeout
    available_memory                 = each.value.memory
    max_instance_count               = each.value.max_inst
    max_instance_request_concurrency = 1
    ingress_settings                 = "ALLOW_INTERNAL_ONLY"
    all_traffic_on_latest_revision   = true
  }

  # ingest: the storage trigger (its tick trigger is google_eventarc_trigger.ingest_tick below).
  dynamic "event_trigger" {
    for_each = each.key == "ingest" ? [1] : []
    content {
      trigger_region        = var.region
      event_type            = "google.cloud.storage.object.v1.finalized"
      retry_policy          = "RETRY_POLICY_RETRY"
      service_account_email = google_service_account.fn[each.key].email
      event_filters {
        attribute = "bucket"
        value     = google_storage_bucket.landing.name
      }
    }
  }

  # report: the minute tick. No retry: the next tick does the same work a minute later.
  dynamic "event_trigger" {
    for_each = each.key == "report" ? [1] : []
    content {
      trigger_region        = var.region
      event_type            = "google.cloud.pubsub.topic.v1.messagePublished"
      pubsub_topic          = google_pubsub_topic.tick.id
      retry_policy          = "RETRY_POLICY_DO_NOT_RETRY"
      service_account_email = google_service_account.fn[each.key].email
    }
  }

  # export: the daily tick. Retry on: a missed day is a missing backup; a retried tick does not
  # start a second export for the same date (create-if-absent marker).
  dynamic "event_trigger" {
    for_each = each.key == "export" ? [1] : []
    content {
      trigger_region        = var.region
      event_type            = "google.cloud.pubsub.topic.v1.messagePublished"
      pubsub_topic          = google_pubsub_topic.export_schedule.id
      retry_policy          = "RETRY_POLICY_RETRY"
      service_account_email = google_service_account.fn[each.key].email
    }
  }

  depends_on = [
    # The storage trigger needs the Cloud Storage service agent to publish, and each trigger's
    # identity to receive events, before the trigger is created.
    google_project_iam_member.storage_agent_publisher,
    google_project_iam_member.fn,
    # Each function reads the deployment key when it starts.
    google_secret_manager_secret_iam_member.deployment_key,
  ]
}

# A Gen2 function takes one event trigger; ingest's second one (the minute tick) is a plain
# Eventarc trigger on the same Cloud Run service.
resource "google_eventarc_trigger" "ingest_tick" {
  name            = "${var.name_prefix}-ingest-tick"
  location        = var.region
  service_account = google_service_account.fn["ingest"].email
  labels          = local.labels

  matching_criteria {
    attribute = "type"
    value     = "google.cloud.pubsub.topic.v1.messagePublished"
  }

  transport {
    pubsub {
      topic = google_pubsub_topic.tick.id
    }
  }

  destination {
    cloud_run_service {
      service = google_cloudfunctions2_function.fn["ingest"].name
      region  = var.region
    }
  }
}
