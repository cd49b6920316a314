"""`make bench`: MailSender against the limit of SMTP and the common Celery recipes (issue 4)."""
